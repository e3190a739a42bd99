"""Fixtures for the storage tests: every MailStore implementation, and Maildir helpers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from popbox.store import MaildirStore, MailStore, MemoryStore
from popbox.store.mailbox import DAY


class FakeClock:
    """The time a store believes it is: the real time plus the days a test skipped.

    It runs as the real clock does (so names made in one test keep their order and
    file times and name times agree) and jumps forward when a test says so.
    """

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped

    def advance(self, *, days: float = 0, seconds: float = 0) -> None:
        self.skipped += days * DAY + seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "maildir"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[MailStore]:
    """Each implementation in turn: the contract suite runs once per backend."""
    backend: MailStore = (
        MemoryStore(clock=clock)
        if request.param == "memory"
        else MaildirStore(tmp_path / "mail", clock=clock)
    )
    yield backend
    await backend.close()


@pytest.fixture
def maildir_store(tmp_path: Path, clock: FakeClock) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", clock=clock)
