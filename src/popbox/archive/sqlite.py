"""The embedded archive: an SQLite index with FTS5 beside content-addressed objects.

``SqliteArchive(path)`` keeps everything under ``path`` (config.archive_path()):
``index.sqlite`` (popbox.archive.sqlite_schema) and ``objects/``
(popbox.archive.objects). It implements popbox.archive.base.Archive; its rules are
kept like this:

- **Durable before it returns.** A new piece is written to its object file and
  fsynced (file and directory) before the transaction that names it commits, in WAL
  mode with synchronous=FULL. A crash in between leaves only an object nobody names;
  ``reindex`` removes those. Small pieces live in the index itself and commit with it.
- **One writer.** Within a process an asyncio lock, across processes (the server's
  workers, the CLI) a file lock on ``write.lock`` held from the first object written
  to the commit, so no writer can free an object another is about to name. Readers
  use their own connections and never wait for a writer.
- **Per user.** Every statement names the user's id; FTS5 matches start with the
  user's owner token (popbox.archive.fts).
- **Bounded.** Messages given as files are mapped, not read (popbox.archive.ingest);
  objects are written and read in chunks; ``add_batch`` prepares and writes its
  messages BATCH_OCTETS at a time inside its one transaction.

All blocking work runs in worker threads (``asyncio.to_thread``); SQLite and file errors become
ArchiveError here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

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
from popbox.archive.ingest import Prepared, prepare
from popbox.archive.objects import ObjectStore
from popbox.archive.sqlite_index import (
    find_entry,
    lookup_user,
    message_pieces,
    remove_entries,
    search_rows,
    store_prepared,
    stored_chunks,
)
from popbox.archive.sqlite_schema import connect, entry_from_row, initialise
from popbox.archive.sqlite_snippets import snippets
from popbox.archive.sqlite_upkeep import (
    REINDEX_BATCH,
    collect_garbage,
    drop_stray_text,
    entries_to_reindex,
    reindex_entries,
)
from popbox.errors import ArchiveError, EntryOnHold, NoSuchEntry, PopboxError
from popbox.fileio import FileLock

__all__ = ["BATCH_MESSAGES", "BATCH_OCTETS", "INDEX_FILE", "SqliteArchive"]

INDEX_FILE: Final = "index.sqlite"
_LOCK_FILE: Final = "write.lock"
# ``add_batch`` is one transaction, prepared and written in parts of at most this many
# octets or messages, so what it holds in memory (two parts: one written, the next
# prepared) stays bounded however many messages it is given.
BATCH_OCTETS: Final = 32 * 1024 * 1024
BATCH_MESSAGES: Final = 500
# Reader connections kept open for reuse (more are opened while busy, then closed).
KEPT_READERS: Final = 4
# Entries an ``entries`` walk fetches at a time.
WALK_PAGE: Final = 500
SECONDS_PER_DAY: Final = 86400
# The archive's directory holds private mail.
DIRECTORY_MODE: Final = 0o700

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _translated(function: Callable[_P, _T]) -> Callable[_P, _T]:
    """SQLite and file errors as ArchiveError (popbox errors pass as they are)."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return function(*args, **kwargs)
        except PopboxError:
            raise
        except sqlite3.Error as exc:
            raise ArchiveError(f"archive index: {exc}") from exc
        except OSError as exc:
            raise ArchiveError(f"archive files: {exc.strerror or exc}") from exc

    return wrapper


class SqliteArchive:
    """The Archive of popbox.archive.base on SQLite and object files under ``path``."""

    def __init__(self, path: Path) -> None:
        self._root = path
        self._objects = ObjectStore(path)
        self._write_lock = asyncio.Lock()
        self._open_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._closed = False

    @property
    def path(self) -> Path:
        return self._root

    # --- connections -------------------------------------------------------------

    def _writer_connection(self) -> sqlite3.Connection:
        with self._open_lock:
            if self._closed:
                raise ArchiveError("archive is closed")
            if self._writer is None:
                self._root.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
                writer = connect(self._root / INDEX_FILE, writer=True)
                try:
                    initialise(writer)
                except BaseException:
                    writer.close()
                    raise
                self._writer = writer
            return self._writer

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        self._writer_connection()  # the file and its tables exist from here on
        with self._open_lock:
            connection = self._readers.pop() if self._readers else None
        if connection is None:
            connection = connect(self._root / INDEX_FILE, writer=False)
        try:
            yield connection
        finally:
            with self._open_lock:
                if not self._closed and len(self._readers) < KEPT_READERS:
                    self._readers.append(connection)
                    connection = None
            if connection is not None:
                connection.close()

    async def _read(self, function: Callable[..., _T], *args: Any) -> _T:
        def run() -> _T:
            with self._reader() as connection:
                return function(connection, *args)

        return await _in_thread(run)

    async def _write(self, function: Callable[..., _T], *args: Any) -> _T:
        def run() -> _T:
            connection = self._writer_connection()
            with FileLock(self._root / _LOCK_FILE, wait=True):
                return function(connection, *args)

        async with self._write_lock:
            return await _in_thread(run)

    # --- adding ------------------------------------------------------------------

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
        (added,) = await self._add(user, [message], source, folder, received, origin)
        return added

    async def add_batch(
        self,
        user: str,
        messages: Sequence[bytes | Path],
        *,
        source: ArchiveSource,
        folder: str = "INBOX",
    ) -> list[Added]:
        return await self._add(user, messages, source, folder, None, None)

    async def _add(
        self,
        user: str,
        messages: Sequence[bytes | Path],
        source: ArchiveSource,
        folder: str,
        received: float | None,
        origin: str | None,
    ) -> list[Added]:
        """One write transaction for all of ``messages``, pipelined: the next part is
        hashed, cut and extracted (Python work) while this one's objects and rows are
        written (file and SQLite work, which let go of the GIL)."""
        if not messages:
            return []
        out: list[Added] = []
        moment = time.time() if received is None else received
        pending: asyncio.Task[list[Prepared]] | None = asyncio.create_task(
            _in_thread(_prepare_batch, messages, 0)
        )
        try:
            async with self._write_lock:
                connection, lock = await _in_thread(self._begin)
                try:
                    start = 0
                    while pending is not None:
                        prepared = await pending
                        start += len(prepared)
                        pending = None
                        if start < len(messages):
                            pending = asyncio.create_task(
                                _in_thread(_prepare_batch, messages, start)
                            )
                        store = (connection, self._objects, user, prepared, source, folder)
                        out.extend(await _in_thread(_store_and_close, *store, moment, origin))
                    await _in_thread(connection.execute, "COMMIT")
                except BaseException:
                    with contextlib.suppress(ArchiveError):
                        await _in_thread(connection.execute, "ROLLBACK")
                    raise
                finally:
                    lock.close()
        finally:
            if pending is not None:
                with contextlib.suppress(Exception):
                    for item in await pending:
                        item.close()
        return out

    def _begin(self) -> tuple[sqlite3.Connection, FileLock]:
        """The writer connection in a write transaction, under the cross-process lock."""
        connection = self._writer_connection()
        lock = FileLock(self._root / _LOCK_FILE, wait=True)
        try:
            connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            lock.close()
            raise
        return connection, lock

    async def known_origins(self, user: str, origins: Collection[str]) -> set[str]:
        wanted = list(dict.fromkeys(origins))
        if not wanted:
            return set()
        return await self._read(_known_origins, user, wanted)

    # --- reading -----------------------------------------------------------------

    async def search(
        self, user: str, query: Query, *, limit: int = DEFAULT_PAGE, offset: int = 0
    ) -> SearchPage:
        limit = max(1, min(limit, MAX_PAGE))
        offset = max(0, offset)
        return await self._read(_search, user, query, limit, offset)

    async def entries(self, user: str, query: Query, *, after_id: int = 0) -> AsyncIterator[Entry]:
        last = after_id
        while True:
            page = await self._read(_walk, user, query, last)
            for entry in page:
                yield entry
            if len(page) < WALK_PAGE:
                return
            last = page[-1].id

    async def entry(self, user: str, entry_id: int) -> Entry:
        return await self._read(_entry, user, entry_id)

    async def read(self, user: str, entry_id: int) -> AsyncIterator[bytes]:
        pieces = await self._read(_pieces_of, user, entry_id)
        chunks = stored_chunks(pieces, self._objects, self._fetch_inline)
        try:
            while chunk := await _in_thread(next, chunks, b""):
                yield chunk
        finally:
            chunks.close()

    def _fetch_inline(self, key: bytes) -> bytes | None:
        with self._reader() as connection:
            row = connection.execute("SELECT data FROM objects WHERE digest = ?", (key,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    async def users(self) -> list[ArchiveUsage]:
        return await self._read(_users)

    # --- changing ----------------------------------------------------------------

    async def set_hold(self, user: str, entry_ids: Sequence[int] | None, hold: bool) -> int:
        return await self._write(
            _set_hold, user, None if entry_ids is None else list(entry_ids), hold
        )

    async def delete(self, user: str, entry_ids: Sequence[int]) -> int:
        if not entry_ids:
            return 0
        return await self._write(_delete, self._objects, user, list(entry_ids))

    async def expire(self, user: str, keep_days: int, now: float) -> int:
        cutoff = now - keep_days * SECONDS_PER_DAY
        return await self._write(_expire, self._objects, user, cutoff)

    async def reindex(self, user: str | None = None) -> int:
        ids = await self._read(entries_to_reindex, user)
        if user is None:
            await self._write(drop_stray_text)
        count = 0
        for start in range(0, len(ids), REINDEX_BATCH):
            batch = ids[start : start + REINDEX_BATCH]
            count += await self._write(reindex_entries, self._objects, batch)
        await self._write(collect_garbage, self._objects)
        return count

    async def close(self) -> None:
        with self._open_lock:
            self._closed = True
            writer, self._writer = self._writer, None
            readers, self._readers = self._readers, []
        async with self._write_lock:
            if writer is not None:
                writer.close()
        for reader in readers:
            reader.close()


async def _in_thread(function: Callable[..., _T], *args: Any) -> _T:
    """``function`` in a worker thread, its errors translated; a cancelled caller
    still waits for the thread to finish, so no lock is let go and no connection
    used by two threads while it runs."""
    future = asyncio.ensure_future(asyncio.to_thread(_translated(function), *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def _store_and_close(
    connection: sqlite3.Connection,
    objects: ObjectStore,
    user: str,
    prepared: list[Prepared],
    source: ArchiveSource,
    folder: str,
    received: float,
    origin: str | None,
) -> list[Added]:
    """store_prepared, then let go of the prepared messages (mapped files) whatever
    happened."""
    try:
        return store_prepared(connection, objects, user, prepared, source, folder, received, origin)
    finally:
        for item in prepared:
            item.close()


def _prepare_batch(messages: Sequence[bytes | Path], start: int) -> list[Prepared]:
    """Messages from ``start`` on, made ready, up to one batch's worth."""
    prepared: list[Prepared] = []
    octets = 0
    try:
        for message in messages[start : start + BATCH_MESSAGES]:
            item = prepare(message)
            prepared.append(item)
            octets += item.size
            if octets >= BATCH_OCTETS:
                break
    except BaseException:
        for item in prepared:
            item.close()
        raise
    return prepared


def _known_origins(connection: sqlite3.Connection, user: str, wanted: list[str]) -> set[str]:
    user_id = lookup_user(connection, user)
    if user_id is None:
        return set()
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = connection.execute(
            f"SELECT origin FROM origins WHERE user_id = ? AND origin IN ({marks})",  # noqa: S608
            (user_id, *chunk),
        )
        found.update(row[0] for row in rows)
    return found


def _search(
    connection: sqlite3.Connection, user: str, query: Query, limit: int, offset: int
) -> SearchPage:
    user_id = lookup_user(connection, user)
    if user_id is None:
        return SearchPage((), 0)
    connection.execute("BEGIN")
    try:
        total, entries = search_rows(connection, user_id, query, limit, offset)
        marks = snippets(connection, user_id, query, [entry.id for entry in entries])
    finally:
        connection.execute("COMMIT")
    return SearchPage(tuple(Hit(entry, marks[entry.id]) for entry in entries), total)


def _walk(connection: sqlite3.Connection, user: str, query: Query, after_id: int) -> list[Entry]:
    user_id = lookup_user(connection, user)
    if user_id is None:
        return []
    return search_rows(connection, user_id, query, WALK_PAGE, 0, after_id=after_id)[1]


def _entry(connection: sqlite3.Connection, user: str, entry_id: int) -> Entry:
    row = find_entry(connection, user, entry_id)
    if row is None:
        raise NoSuchEntry(f"no archived message {entry_id}")
    return entry_from_row(row)


def _pieces_of(
    connection: sqlite3.Connection, user: str, entry_id: int
) -> list[tuple[bytes, bool]]:
    row = find_entry(connection, user, entry_id)
    if row is None:
        raise NoSuchEntry(f"no archived message {entry_id}")
    return message_pieces(connection, bytes.fromhex(entry_from_row(row).digest))


def _users(connection: sqlite3.Connection) -> list[ArchiveUsage]:
    rows = connection.execute(
        "SELECT u.name, count(*), sum(e.size), sum(e.hold) FROM entries e "
        "JOIN users u ON u.id = e.user_id GROUP BY u.id ORDER BY u.name"
    )
    return [ArchiveUsage(name, count, octets, held) for name, count, octets, held in rows]


def _owned(connection: sqlite3.Connection, user_id: int, ids: list[int]) -> list[tuple[int, int]]:
    """(id, hold) of those of ``ids`` that are the user's."""
    found: list[tuple[int, int]] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found.extend(
            connection.execute(
                f"SELECT id, hold FROM entries WHERE user_id = ? AND id IN ({marks})",  # noqa: S608
                (user_id, *chunk),
            )
        )
    return found


def _set_hold(connection: sqlite3.Connection, user: str, ids: list[int] | None, hold: bool) -> int:
    user_id = lookup_user(connection, user)
    if user_id is None:
        return 0
    connection.execute("BEGIN IMMEDIATE")
    try:
        if ids is None:
            changed = connection.execute(
                "UPDATE entries SET hold = ? WHERE user_id = ? AND hold != ?",
                (int(hold), user_id, int(hold)),
            ).rowcount
        else:
            targets = [
                entry_id
                for entry_id, held in _owned(connection, user_id, ids)
                if bool(held) != hold
            ]
            connection.executemany(
                "UPDATE entries SET hold = ? WHERE id = ?",
                [(int(hold), entry_id) for entry_id in targets],
            )
            changed = len(targets)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return changed


def _delete(connection: sqlite3.Connection, objects: ObjectStore, user: str, ids: list[int]) -> int:
    user_id = lookup_user(connection, user)
    if user_id is None:
        return 0
    connection.execute("BEGIN IMMEDIATE")
    try:
        owned = _owned(connection, user_id, list(dict.fromkeys(ids)))
        held = sorted(entry_id for entry_id, hold in owned if hold)
        if held:
            raise EntryOnHold(f"archived message {held[0]} is under legal hold")
        freed = remove_entries(connection, [entry_id for entry_id, _ in owned])
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    # Only once the index no longer names them.
    objects.remove(freed)
    return len(owned)


def _expire(connection: sqlite3.Connection, objects: ObjectStore, user: str, cutoff: float) -> int:
    user_id = lookup_user(connection, user)
    if user_id is None:
        return 0
    connection.execute("BEGIN IMMEDIATE")
    try:
        ids = [
            row[0]
            for row in connection.execute(
                "SELECT id FROM entries WHERE user_id = ? AND received < ? AND hold = 0",
                (user_id, cutoff),
            )
        ]
        freed = remove_entries(connection, ids)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    objects.remove(freed)
    return len(ids)
