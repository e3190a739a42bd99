"""Fixtures for the storage tests: every MailStore implementation, and Maildir helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from popbox.store import MaildirStore, MailStore, MemoryStore
from support.clock import FakeClock
from support.pgstore import postgres_store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "maildir", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[MailStore]:
    """Each implementation in turn: the contract suite runs once per backend."""
    backend: MailStore
    if request.param == "memory":
        backend = MemoryStore(clock=clock)
    elif request.param == "maildir":
        backend = MaildirStore(tmp_path / "mail", clock=clock)
    else:
        backend = postgres_store(request.getfixturevalue("postgres_dsn"), clock)
    yield backend
    await backend.close()


@pytest.fixture
def maildir_store(tmp_path: Path, clock: FakeClock) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", clock=clock)
