"""The PostgreSQL archive's entries: a message made ready to store (read, cut,
extracted and folded, off the event loop), stored as a user's entry in one
transaction with its content, rebuilt from its stored message (``reindex``), and
read back as an ``Entry``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from popbox.archive.base import Added, ArchiveSource, Entry
from popbox.archive.extract import Extracted, extract
from popbox.archive.ingest import Prepared, prepare
from popbox.archive.postgresql_content import cut, piece_list_of, read_pieces, take
from popbox.archive.postgresql_query import ENTRY_COLUMNS, PEOPLE, WORDS, fold, snippet_source
from popbox.errors import ArchiveError, NoSuchEntry
from popbox.pgsql import transaction

__all__ = ["Ready", "entry_of", "make_ready", "reindex_entry", "store_ready"]

# Characters of a message's text kept beside its entry for snippets: ts_headline
# parses all of it for every hit shown, so a page of 50 stays a few MB of parsing.
SNIPPET_SOURCE: Final = 64 * 1024
# A tsvector holds at most 1 MB (PostgreSQL's limit): text and attachment names this
# long, of distinct words, could pass it, so such an entry is written under a
# savepoint, and with half of them indexed (and again) if it does.
LARGE_TEXT: Final = 128 * 1024

# The entry, and (when it is new) one more count on its message if that is stored
# already: the common case of a delivery in one statement. Parameters: user ..
# people, then the digest again. Returns the entry's columns and whether it counted.
_ENTRY_VALUES: Final = sql.SQL(
    "WITH entry AS (INSERT INTO archive_entries AS e (username, digest, size, received, "
    "source, folder, date, sender, recipients, subject, message_id, attachments, body, "
    "words, people) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {words}, {people}) "
    "ON CONFLICT (username, digest) DO NOTHING RETURNING {columns}), "
    "counted AS (UPDATE archive_messages SET refs = refs + 1 "
    "WHERE digest = %s AND EXISTS (SELECT 1 FROM entry) RETURNING digest) "
    "SELECT entry.*, EXISTS (SELECT 1 FROM counted) FROM entry"
).format(words=sql.SQL(WORDS), people=sql.SQL(PEOPLE), columns=ENTRY_COLUMNS)
_EXISTING: Final = sql.SQL(
    "SELECT {columns} FROM archive_entries AS e WHERE e.username = %s AND e.digest = %s"
).format(columns=ENTRY_COLUMNS)
_REINDEX: Final = sql.SQL(
    "UPDATE archive_entries SET date = %s, sender = %s, recipients = %s, subject = %s, "
    "message_id = %s, attachments = %s, body = %s, words = {words}, people = {people} "
    "WHERE username = %s AND id = %s"
).format(words=sql.SQL(WORDS), people=sql.SQL(PEOPLE))
_ORIGIN: Final = (
    "INSERT INTO archive_origins (username, origin) VALUES (%s, %s) ON CONFLICT DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class Indexed:
    """What one entry is searched and shown by, from its message."""

    extracted: Extracted
    folded: tuple[str, str, str, str, str]
    """Subject, sender, recipients, text, attachment names: as ``fold`` makes them."""

    @classmethod
    def of(cls, found: Extracted) -> Indexed:
        folded = (
            fold(found.subject),
            fold(found.sender),
            fold(found.recipients),
            fold(found.body),
            fold(" ".join(found.attachments)),
        )
        return cls(found, folded)

    @property
    def large(self) -> bool:
        """Whether the tsvectors might not fit (see LARGE_TEXT)."""
        return len(self.folded[3]) + len(self.folded[4]) > LARGE_TEXT

    def columns(self, text_limit: int | None = None) -> tuple[object, ...]:
        """date .. people of ``_REINDEX``; ``text_limit``: index only that much of
        the text and of the attachment names."""
        found = self.extracted
        subject, sender, recipients, text, names = self.folded
        if text_limit is not None:
            text, names = text[:text_limit], names[:text_limit]
        return (
            found.date,
            found.sender,
            found.recipients,
            found.subject,
            found.message_id,
            list(found.attachments),
            snippet_source(found.body[:SNIPPET_SOURCE]),
            subject, sender, recipients, text, names,
            sender, recipients,
        )  # fmt: skip


class Ready:
    """A message ready to store: read (or mapped) and cut (popbox.archive.ingest),
    its pieces (``content``) and what is indexed. Close it (``with``) once stored."""

    __slots__ = ("_prepared", "content", "indexed")

    def __init__(self, prepared: Prepared) -> None:
        self._prepared = prepared
        self.content = cut(prepared)
        self.indexed = Indexed.of(prepared.text)

    def close(self) -> None:
        self._prepared.close()

    def __enter__(self) -> Ready:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ready(message: bytes | Path) -> Ready:
    prepared = prepare(message)
    try:
        return Ready(prepared)
    except BaseException:
        prepared.close()
        raise


async def make_ready(message: bytes | Path) -> Ready:
    """``message`` read, cut and extracted in a worker thread (it is CPU work)."""
    work = asyncio.ensure_future(asyncio.to_thread(_ready, message))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        # The worker cannot be stopped: whatever it maps is let go once it is done.
        work.add_done_callback(_close_unused)
        raise


def _close_unused(work: asyncio.Future[Ready]) -> None:
    if not work.cancelled() and work.exception() is None:
        work.result().close()


async def _fitting(
    conn: psycopg.AsyncConnection,
    indexed: Indexed,
    statement: sql.Composed,
    values: Callable[[int | None], tuple[object, ...]],
) -> psycopg.AsyncCursor[tuple[Any, ...]]:
    """Run ``statement`` with the ``values`` of ``indexed`` (given a text limit) under
    a savepoint, halving the text while its tsvector is too large for PostgreSQL. A
    message whose other fields alone are too large (they are bounded far below it)
    is the driver's error, as any other."""
    if not indexed.large:
        return await conn.execute(statement, values(None))
    limit: int | None = None
    while True:
        try:
            async with conn.transaction():
                return await conn.execute(statement, values(limit))
        except psycopg.errors.ProgramLimitExceeded:
            if limit == 0:
                raise
            full = max(len(indexed.folded[3]), len(indexed.folded[4]))
            limit = (full if limit is None else limit) // 2


async def store_ready(
    conn: psycopg.AsyncConnection,
    user: str,
    ready: Ready,
    *,
    source: ArchiveSource,
    folder: str,
    received: float,
    origin: str | None = None,
) -> Added:
    """Keep ``ready`` as the user's entry in ``conn``'s transaction; an entry the
    user has already is returned as it is (``new`` False) and nothing is stored."""
    content = ready.content
    if origin is not None:
        await conn.execute(_ORIGIN, (user, origin))
    head = (user, content.digest, content.size, received, source.value, folder)
    cursor = await _fitting(
        conn,
        ready.indexed,
        _ENTRY_VALUES,
        lambda limit: (*head, *ready.indexed.columns(limit), content.digest),
    )
    # The entry's columns and whether its message, stored already, was counted; or
    # None: the user has this message already.
    row = await cursor.fetchone()
    if row is None:
        cursor = await conn.execute(_EXISTING, (user, content.digest))
        existing = await cursor.fetchone()
        if existing is None:
            raise ArchiveError(f"{user}'s entry for a message vanished while it was added")
        return Added(entry_of(existing), new=False)
    await take(conn, content, counted=bool(row[-1]))
    return Added(entry_of(row[:-1]), new=True)


def _indexed(data: bytes) -> Indexed:
    return Indexed.of(extract(data))


async def reindex_entry(pool: AsyncConnectionPool, user: str, entry_id: int) -> bool:
    """Index the user's entry again from its stored message; False if it is gone."""
    doing = f"reindex entry {entry_id} of {user}"
    digests = await piece_list_of(pool, user, entry_id)
    if digests is None:
        return False
    try:
        data = b"".join([piece async for piece in read_pieces(pool, digests, doing)])
    except NoSuchEntry:
        return False  # deleted while it was read
    indexed = await asyncio.to_thread(_indexed, data)
    del data
    async with transaction(pool, ArchiveError, doing) as conn:
        cursor = await _fitting(
            conn, indexed, _REINDEX, lambda limit: (*indexed.columns(limit), user, entry_id)
        )
        return cursor.rowcount > 0


def entry_of(row: Sequence[object]) -> Entry:
    """An Entry from the ENTRY_COLUMNS of a row."""
    (
        entry_id, user, digest, size, received, date, sender, recipients, subject,
        message_id, attachments, source, folder, hold,
    ) = row  # fmt: skip
    assert isinstance(digest, bytes | memoryview)
    assert isinstance(attachments, list)
    return Entry(
        id=int(entry_id),  # type: ignore[call-overload]
        user=str(user),
        digest=bytes(digest).hex(),
        size=int(size),  # type: ignore[call-overload]
        received=float(received),  # type: ignore[arg-type]
        date=None if date is None else float(date),  # type: ignore[arg-type]
        sender=str(sender),
        recipients=str(recipients),
        subject=str(subject),
        message_id=str(message_id),
        attachments=tuple(str(name) for name in attachments),
        source=ArchiveSource(source),
        folder=str(folder),
        hold=bool(hold),
    )
