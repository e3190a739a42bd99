"""The archive in PostgreSQL (``archive.backend = "postgresql"``): every node of a
cluster keeps and searches every user's archive in the ``[postgresql]`` database.

It keeps the rules of popbox.archive.base, as the SQLite archive does: messages are
cut into pieces stored once across users (archive.postgresql_content), each entry
is indexed in two tsvectors searched through GIN indexes (the tables and why in
archive.postgresql_schema, the query language in archive.postgresql_query), and
every add, delete and expiry is one transaction, committed before it returns. Every
driver error becomes ArchiveError through ``pgsql.database_errors``; a deadlock or
serialisation failure between nodes is retried a few times first.

The pool is opened, and the tables made or upgraded, on first use (once, under a
lock), so the archive is built synchronously by the composition root, as the
PostgreSQL mail store is: ``PostgresArchive(backends.pool_settings(config, "archive"))``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Final, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from popbox.archive.base import (
    DEFAULT_PAGE,
    MAX_PAGE,
    Added,
    ArchiveSource,
    ArchiveUsage,
    Entry,
    Hit,
    Query,
    SearchPage,
)
from popbox.archive.postgresql_content import piece_list_of, read_pieces, release
from popbox.archive.postgresql_entries import entry_of, make_ready, reindex_entry, store_ready
from popbox.archive.postgresql_query import (
    ENTRY_COLUMNS,
    entries_statement,
    highlight_tsquery,
    search_statement,
    snippet_of,
)
from popbox.archive.postgresql_schema import SCHEMA
from popbox.errors import ArchiveError, EntryOnHold, NoSuchEntry
from popbox.pgsql import PoolSettings, autocommit, ensure_schema, open_pool, transaction

__all__ = ["PostgresArchive"]

log = logging.getLogger("popbox.archive.postgresql")

T = TypeVar("T")

# Entries an export's walk (``entries``) reads per statement.
ENTRIES_BATCH: Final = 500
# Entries expired per transaction: a retention run over years of mail commits as it
# goes rather than holding one transaction over all of it.
EXPIRE_BATCH: Final = 1000
# Entries listed per statement while reindexing (each is then reindexed in a
# transaction of its own, so a long reindex never holds back other writers).
REINDEX_BATCH: Final = 100
# Tries of one transaction that lost a deadlock or a serialisation race to another
# node (SQLSTATE 40P01, 40001): the other went through, so a later try does; under a
# burst of nodes sharing the same attachments a few tries may lose in a row.
RETRIES: Final = 8
# Seconds before the first retry, doubled at each, with jitter so that the losers of
# one race do not meet again in step (2.5 s in all at the most).
RETRY_PAUSE: Final = 0.01
_RACES: Final = frozenset({"40P01", "40001"})
DAY: Final = 86400.0  # seconds, for ``keep_days``
# The longest one search may run (milliseconds): a query that matches most of a huge
# archive is an error to narrow, not a database connection held for minutes (a web
# request's usual gateway timeout is a minute).
SEARCH_TIMEOUT_MS: Final = 30_000
_SEARCH_TIMEOUT: Final = "SELECT set_config('statement_timeout', %s, true)"

_BY_ID: Final = sql.SQL(
    "SELECT {columns} FROM archive_entries AS e WHERE e.username = %s AND e.id = %s"
).format(columns=ENTRY_COLUMNS)
_LOCK_IDS: Final = """
SELECT id, hold FROM archive_entries WHERE username = %s AND id = ANY(%s)
ORDER BY id FOR UPDATE
"""
_DELETE_IDS: Final = (
    "DELETE FROM archive_entries WHERE username = %s AND id = ANY(%s) RETURNING digest"
)
_HOLD_IDS: Final = """
UPDATE archive_entries SET hold = %s WHERE username = %s AND id = ANY(%s) AND hold <> %s
"""
_HOLD_ALL: Final = "UPDATE archive_entries SET hold = %s WHERE username = %s AND hold <> %s"
# Parameters: user, cutoff, batch.
_EXPIRE: Final = """
DELETE FROM archive_entries WHERE id IN (
    SELECT id FROM archive_entries WHERE username = %s AND received < %s AND NOT hold
    ORDER BY id LIMIT %s FOR UPDATE)
RETURNING digest
"""
_USERS: Final = """
SELECT username, count(*), coalesce(sum(size), 0), count(*) FILTER (WHERE hold)
FROM archive_entries GROUP BY username ORDER BY username
"""
_KNOWN_ORIGINS: Final = (
    "SELECT origin FROM archive_origins WHERE username = %s AND origin = ANY(%s)"
)
# Parameters: after id, batch (every user), or user, after id, batch.
_REINDEX_ALL: Final = "SELECT id, username FROM archive_entries WHERE id > %s ORDER BY id LIMIT %s"
_REINDEX_USER: Final = """
SELECT id, username FROM archive_entries WHERE username = %s AND id > %s ORDER BY id LIMIT %s
"""


class PostgresArchive:
    """Archives in PostgreSQL, shared by every node that names the same database."""

    def __init__(self, settings: PoolSettings, *, clock: Callable[[], float] = time.time) -> None:
        """``clock``: when a message without ``received`` came in (tests move it)."""
        self._settings = settings
        self._clock = clock
        self._pool: AsyncConnectionPool | None = None
        self._ready = False
        self._opening: asyncio.Lock | None = None

    async def pool(self) -> AsyncConnectionPool:
        """The pool, opened and the tables set up on first use; ArchiveError while
        the database cannot be reached (the next call tries again)."""
        if self._ready and self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                self._pool = await open_pool(self._settings, name="popbox-archive")
            if not self._ready:
                await ensure_schema(self._pool, SCHEMA, error=ArchiveError)
                self._ready = True
        return self._pool

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt`` (one whole transaction), again if it lost a race to another
        node; ArchiveError once it has lost RETRIES times."""
        for tries in range(1, RETRIES + 1):
            try:
                return await attempt()
            except ArchiveError as exc:
                cause = exc.__cause__
                if not isinstance(cause, psycopg.Error) or cause.sqlstate not in _RACES:
                    raise
                if tries == RETRIES:
                    raise
                log.info("archive transaction lost a race (%s); trying again", cause.sqlstate)
                await asyncio.sleep(RETRY_PAUSE * 2**tries * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    # -- adding -------------------------------------------------------------------

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
        when = self._clock() if received is None else received
        pool = await self.pool()
        with await make_ready(message) as ready:

            async def attempt() -> Added:
                doing = f"archive a message of {user}"
                async with transaction(pool, ArchiveError, doing) as conn:
                    return await store_ready(
                        conn, user, ready, source=source, folder=folder, received=when,
                        origin=origin,
                    )  # fmt: skip

            return await self._retrying(attempt)

    async def add_batch(
        self,
        user: str,
        messages: Sequence[bytes | Path],
        *,
        source: ArchiveSource,
        folder: str = "INBOX",
    ) -> list[Added]:
        if not messages:
            return []
        pool = await self.pool()
        when = self._clock()

        async def attempt() -> list[Added]:
            added: list[Added] = []
            doing = f"archive {len(messages)} messages of {user}"
            async with transaction(pool, ArchiveError, doing) as conn:
                # One message in memory at a time, however large the batch.
                for message in messages:
                    with await make_ready(message) as ready:
                        stored = await store_ready(
                            conn, user, ready, source=source, folder=folder, received=when
                        )
                    added.append(stored)
            return added

        return await self._retrying(attempt)

    async def known_origins(self, user: str, origins: Collection[str]) -> set[str]:
        if not origins:
            return set()
        pool = await self.pool()
        async with autocommit(pool, ArchiveError, f"origins of {user}") as conn:
            cursor = await conn.execute(_KNOWN_ORIGINS, (user, list(origins)))
            return {row[0] for row in await cursor.fetchall()}

    # -- finding and reading --------------------------------------------------------

    async def search(
        self, user: str, query: Query, *, limit: int = DEFAULT_PAGE, offset: int = 0
    ) -> SearchPage:
        # As the SQLite archive: a page holds 1 to MAX_PAGE hits, from offset 0 on.
        limit = max(1, min(limit, MAX_PAGE))
        statement, params = search_statement(user, query, limit, max(0, offset))
        lead = highlight_tsquery(query) is None
        pool = await self.pool()
        async with transaction(pool, ArchiveError, f"search the archive of {user}") as conn:
            await conn.execute(_SEARCH_TIMEOUT, (str(SEARCH_TIMEOUT_MS),))
            cursor = await conn.execute(statement, params)
            rows = await cursor.fetchall()
        total = int(rows[0][0]) if rows else 0
        hits = tuple(
            Hit(entry_of(row[1:-1]), snippet_of(row[-1], lead=lead))
            for row in rows
            if row[1] is not None
        )
        return SearchPage(hits, total)

    async def entries(self, user: str, query: Query, *, after_id: int = 0) -> AsyncIterator[Entry]:
        pool = await self.pool()
        last = after_id
        while True:
            statement, params = entries_statement(user, query, last, ENTRIES_BATCH)
            async with autocommit(pool, ArchiveError, f"list the archive of {user}") as conn:
                cursor = await conn.execute(statement, params)
                rows = await cursor.fetchall()
            for row in rows:
                entry = entry_of(row)
                last = entry.id
                yield entry
            if len(rows) < ENTRIES_BATCH:
                return

    async def entry(self, user: str, entry_id: int) -> Entry:
        pool = await self.pool()
        async with autocommit(pool, ArchiveError, f"entry {entry_id} of {user}") as conn:
            cursor = await conn.execute(_BY_ID, (user, entry_id))
            row = await cursor.fetchone()
        if row is None:
            raise NoSuchEntry(f"{user} has no archived message {entry_id}")
        return entry_of(row)

    async def read(self, user: str, entry_id: int) -> AsyncIterator[bytes]:
        pool = await self.pool()
        digests = await piece_list_of(pool, user, entry_id)
        if digests is None:
            raise NoSuchEntry(f"{user} has no archived message {entry_id}")
        async for piece in read_pieces(pool, digests, f"read entry {entry_id} of {user}"):
            yield piece

    # -- holding and removing -------------------------------------------------------

    async def set_hold(self, user: str, entry_ids: Sequence[int] | None, hold: bool) -> int:
        """Ids that are not the user's (another's, or none at all) change nothing."""
        pool = await self.pool()
        doing = f"{'hold' if hold else 'release'} archived messages of {user}"
        async with autocommit(pool, ArchiveError, doing) as conn:
            if entry_ids is None:
                cursor = await conn.execute(_HOLD_ALL, (hold, user, hold))
            else:
                ids = sorted(set(entry_ids))
                cursor = await conn.execute(_HOLD_IDS, (hold, user, ids, hold))
            return cursor.rowcount

    async def delete(self, user: str, entry_ids: Sequence[int]) -> int:
        """Ids that are not the user's (another's, or none at all) are left alone."""
        ids = sorted(set(entry_ids))
        if not ids:
            return 0
        pool = await self.pool()

        async def attempt() -> int:
            doing = f"delete archived messages of {user}"
            async with transaction(pool, ArchiveError, doing) as conn:
                cursor = await conn.execute(_LOCK_IDS, (user, ids))
                held = [row[0] for row in await cursor.fetchall() if row[1]]
                if held:
                    raise EntryOnHold(f"archived message {held[0]} is under legal hold")
                cursor = await conn.execute(_DELETE_IDS, (user, ids))
                digests = [bytes(row[0]) for row in await cursor.fetchall()]
                await release(conn, digests)
                return len(digests)

        return await self._retrying(attempt)

    async def expire(self, user: str, keep_days: int, now: float) -> int:
        pool = await self.pool()
        cutoff = now - keep_days * DAY

        async def attempt() -> int:
            doing = f"expire archived messages of {user}"
            async with transaction(pool, ArchiveError, doing) as conn:
                cursor = await conn.execute(_EXPIRE, (user, cutoff, EXPIRE_BATCH))
                digests = [bytes(row[0]) for row in await cursor.fetchall()]
                await release(conn, digests)
                return len(digests)

        removed = 0
        while True:
            count = await self._retrying(attempt)
            removed += count
            if count < EXPIRE_BATCH:
                return removed

    # -- the whole archive ------------------------------------------------------------

    async def users(self) -> list[ArchiveUsage]:
        pool = await self.pool()
        async with autocommit(pool, ArchiveError, "list the archive's users") as conn:
            cursor = await conn.execute(_USERS)
            rows = await cursor.fetchall()
        return [ArchiveUsage(row[0], int(row[1]), int(row[2]), int(row[3])) for row in rows]

    async def reindex(self, user: str | None = None) -> int:
        pool = await self.pool()
        done = 0
        last = 0
        while True:
            async with autocommit(pool, ArchiveError, "list entries to reindex") as conn:
                if user is None:
                    cursor = await conn.execute(_REINDEX_ALL, (last, REINDEX_BATCH))
                else:
                    cursor = await conn.execute(_REINDEX_USER, (user, last, REINDEX_BATCH))
                rows = await cursor.fetchall()
            for entry_id, owner in rows:
                if await reindex_entry(pool, owner, entry_id):
                    done += 1
                last = entry_id
            if len(rows) < REINDEX_BATCH:
                return done

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._ready = False
        if pool is not None:
            await pool.close()
