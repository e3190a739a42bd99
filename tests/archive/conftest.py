"""Fixtures for the archive tests: every Archive implementation through one factory,
and messages to keep in it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from popbox.archive.base import Archive
from popbox.archive.sqlite import SqliteArchive

ArchiveFactory = Callable[[Path], Awaitable[Archive]]


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


def message(
    subject: str = "hello",
    body: str = "some text",
    *,
    sender: str = "Alice <alice@example.com>",
    to: str = "bob@example.com",
    date: str | None = "Mon, 07 Dec 2026 10:00:00 +0000",
    extra: str = "",
) -> bytes:
    """A plain text message."""
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
    if date is not None:
        head += f"Date: {date}\r\n"
    return (
        head + extra + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n"
    ).encode()
