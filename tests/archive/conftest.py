"""Fixtures for the archive tests: every Archive implementation through one factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from archive_helpers import ArchiveFactory

from popbox.archive.base import Archive
from popbox.archive.sqlite import SqliteArchive


async def make_sqlite(tmp_path: Path) -> Archive:
    return SqliteArchive(tmp_path / "archive")


# Each backend's factory by name; a backend adds itself here (and to the params below).
FACTORIES: dict[str, ArchiveFactory] = {"sqlite": make_sqlite}


@pytest.fixture(params=["sqlite"])
def make_archive(request: pytest.FixtureRequest) -> ArchiveFactory:
    """``await make_archive(tmp_path)``: a fresh archive of the backend under test
    (the same directory gives the same archive again, for a reopen)."""
    return FACTORIES[request.param]


@pytest.fixture
async def archive(make_archive: ArchiveFactory, tmp_path: Path) -> AsyncIterator[Archive]:
    """Each implementation in turn: the contract suite runs once per backend."""
    backend = await make_archive(tmp_path)
    yield backend
    await backend.close()
