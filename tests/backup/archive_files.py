"""The embedded archive (popbox.archive.sqlite.SqliteArchive) driven from a test's
threads: adds while a backup runs, and what a search shows before and after."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from popbox.archive.base import MAX_PAGE, ArchiveSource, MatchAll
from popbox.archive.query import parse_query
from popbox.archive.sqlite import SqliteArchive

T = TypeVar("T")

# What a search result shows of one message: its id, subject and whole octets.
Shown = tuple[int, str, bytes]


class ArchiveFiles:
    """One SqliteArchive with an event loop of its own, for one thread at a time."""

    def __init__(self, path: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._archive = SqliteArchive(path)

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(work)

    def close(self) -> None:
        self._run(self._archive.close())
        self._loop.close()

    def add(self, user: str, subject: str, body: str) -> int:
        data = f"From: a@example.net\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()
        added = self._run(self._archive.add(user, data, source=ArchiveSource.IMPORTED))
        return added.entry.id

    def search(self, user: str, text: str) -> list[Shown]:
        """The hits of a search as the web page would show them, newest first."""

        async def hits() -> list[Shown]:
            page = await self._archive.search(user, parse_query(text), limit=MAX_PAGE)
            shown = []
            for hit in page.hits:
                octets = b"".join([chunk async for chunk in self._archive.read(user, hit.entry.id)])
                shown.append((hit.entry.id, hit.entry.subject, octets))
            return shown

        return self._run(hits())

    def ids(self, user: str) -> list[int]:
        async def every() -> list[int]:
            return [entry.id async for entry in self._archive.entries(user, MatchAll())]

        return self._run(every())
