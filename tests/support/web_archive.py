"""An in-memory Archive for the web page's tests while no real backend is at hand:
per user, byte-exact, searched by a plain reading of the query AST over what
popbox.archive.extract takes from a message."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path

from popbox.archive.base import (
    DEFAULT_PAGE,
    Added,
    And,
    ArchiveSource,
    ArchiveUsage,
    DateBound,
    Entry,
    Has,
    Hit,
    MatchAll,
    Not,
    Or,
    Query,
    SearchPage,
    SizeBound,
    Snippet,
    Term,
    TermField,
)
from popbox.archive.extract import Extracted, extract
from popbox.archive.query import normalise
from popbox.errors import NoSuchEntry

__all__ = ["MemoryArchive"]


class MemoryArchive:
    def __init__(self) -> None:
        self._entries: dict[int, tuple[Entry, bytes, Extracted]] = {}
        self._origins: dict[str, set[str]] = {}
        self._next = 1

    async def add(
        self,
        user: str,
        message: bytes | Path,
        *,
        source: ArchiveSource,
        folder: str = "INBOX",
        received: float | None = None,
        origin: str | None = None,
    ) -> Added:
        data = message.read_bytes() if isinstance(message, Path) else bytes(message)
        digest = hashlib.sha256(data).hexdigest()
        for entry, _, _ in self._entries.values():
            if entry.user == user and entry.digest == digest:
                return Added(entry, False)
        facts = extract(data)
        entry = Entry(
            id=self._next,
            user=user,
            digest=digest,
            size=len(data),
            received=received if received is not None else time.time(),
            date=facts.date,
            sender=facts.sender,
            recipients=facts.recipients,
            subject=facts.subject,
            message_id=facts.message_id,
            attachments=facts.attachments,
            source=source,
            folder=folder,
            hold=False,
        )
        self._next += 1
        self._entries[entry.id] = (entry, data, facts)
        if origin is not None:
            self._origins.setdefault(user, set()).add(origin)
        return Added(entry, True)

    async def known_origins(self, user: str, origins: Collection[str]) -> set[str]:
        return set(origins) & self._origins.get(user, set())

    async def add_batch(
        self,
        user: str,
        messages: Sequence[bytes | Path],
        *,
        source: ArchiveSource,
        folder: str = "INBOX",
    ) -> list[Added]:
        return [await self.add(user, m, source=source, folder=folder) for m in messages]

    def _matches(self, query: Query, entry: Entry, facts: Extracted) -> bool:
        if isinstance(query, MatchAll):
            return True
        if isinstance(query, And):
            return all(self._matches(part, entry, facts) for part in query.parts)
        if isinstance(query, Or):
            return any(self._matches(part, entry, facts) for part in query.parts)
        if isinstance(query, Not):
            return not self._matches(query.part, entry, facts)
        if isinstance(query, Has):
            return facts.has_attachment
        if isinstance(query, DateBound):
            return (entry.sort_time < query.moment) == query.before
        if isinstance(query, SizeBound):
            return entry.size > query.octets if query.larger else entry.size < query.octets
        assert isinstance(query, Term)
        fields = {
            TermField.FROM: facts.sender,
            TermField.TO: facts.recipients,
            TermField.SUBJECT: facts.subject,
            TermField.BODY: facts.body,
            TermField.FILENAME: " ".join(facts.attachments),
        }
        haystack = fields.get(query.field) or " ".join(
            [facts.sender, facts.recipients, facts.subject, facts.body, *facts.attachments]
        )
        return normalise(query.text.rstrip("*")) in normalise(haystack)

    def _mine(self, user: str, query: Query) -> list[tuple[Entry, Extracted]]:
        return [
            (entry, facts)
            for entry, _, facts in self._entries.values()
            if entry.user == user and self._matches(query, entry, facts)
        ]

    async def search(
        self, user: str, query: Query, *, limit: int = DEFAULT_PAGE, offset: int = 0
    ) -> SearchPage:
        found = sorted(self._mine(user, query), key=lambda pair: -pair[0].sort_time)
        words = [t.text for t in _terms(query)]
        hits = tuple(
            Hit(entry, _snippet(facts.body, words))
            for entry, facts in found[offset : offset + limit]
        )
        return SearchPage(hits, len(found))

    async def entries(self, user: str, query: Query, *, after_id: int = 0) -> AsyncIterator[Entry]:
        for entry, _ in sorted(self._mine(user, query), key=lambda pair: pair[0].id):
            if entry.id > after_id:
                yield entry

    async def entry(self, user: str, entry_id: int) -> Entry:
        found = self._entries.get(entry_id)
        if found is None or found[0].user != user:
            raise NoSuchEntry(f"no entry {entry_id}")
        return found[0]

    async def read(self, user: str, entry_id: int) -> AsyncIterator[bytes]:
        await self.entry(user, entry_id)
        data = self._entries[entry_id][1]
        for start in range(0, len(data), 7):  # small chunks: the readers must join them
            yield data[start : start + 7]

    async def set_hold(self, user: str, entry_ids: Sequence[int] | None, hold: bool) -> int:
        return 0

    async def delete(self, user: str, entry_ids: Sequence[int]) -> int:
        gone = [i for i in entry_ids if i in self._entries and self._entries[i][0].user == user]
        for i in gone:
            del self._entries[i]
        return len(gone)

    async def expire(self, user: str, keep_days: int, now: float) -> int:
        return 0

    async def users(self) -> list[ArchiveUsage]:
        return []

    async def reindex(self, user: str | None = None) -> int:
        return 0

    async def close(self) -> None:
        return None


def _terms(query: Query) -> list[Term]:
    if isinstance(query, Term):
        return [query]
    if isinstance(query, And | Or):
        return [t for part in query.parts for t in _terms(part)]
    return []


def _snippet(body: str, words: list[str]) -> Snippet:
    lowered = body.lower()
    for word in words:
        at = lowered.find(word.rstrip("*").lower())
        if at >= 0:
            end = at + len(word.rstrip("*"))
            return Snippet(
                (
                    (body[max(0, at - 40) : at], False),
                    (body[at:end], True),
                    (body[end : end + 80], False),
                )
            )
    return Snippet(((body[:120], False),)) if body else Snippet()
