"""Fixtures for the archive tests: every Archive implementation through one factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from archive_helpers import ArchiveFactory

from popbox.archive.base import Archive
from popbox.archive.sqlite import SqliteArchive


async def make_sqlite(tmp_path: Path) -> Archive:
    return SqliteArchive(tmp_path / "archive")


# Each backend by name: a function of the test's request (for the fixtures a backend
# needs, such as ``postgres_dsn``) giving its factory. A backend adds itself here and
# to the params of ``make_archive``.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], ArchiveFactory]] = {
    "sqlite": lambda request: make_sqlite,
}


@pytest.fixture(params=["sqlite"])
def make_archive(request: pytest.FixtureRequest) -> ArchiveFactory:
    """``await make_archive(tmp_path)``: a fresh archive of the backend under test
    (the same directory gives the same archive again, for a reopen)."""
    return BACKENDS[request.param](request)


@pytest.fixture
async def archive(make_archive: ArchiveFactory, tmp_path: Path) -> AsyncIterator[Archive]:
    """Each implementation in turn: the contract suite runs once per backend."""
    backend = await make_archive(tmp_path)
    yield backend
    await backend.close()
