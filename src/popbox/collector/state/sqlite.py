"""The collector's state in SQLite (WAL, ``synchronous = FULL``), reached through one thread.

Every change commits at once: a run killed at any moment loses at most the messages in
hand, which the next run redelivers (and the per-sink record lets sinks that already
have them skip them). Every statement, read or write, runs on the state's own thread
(``_call``): no commit's fsync stalls the event loop, no reader waits behind one on
the loop, and writes never interleave, so the connection needs no lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from popbox.collector.state.base import (
    ERROR_TEXT_MAX,
    AccountStatus,
    Attempt,
    Delivered,
    MessageRecord,
)
from popbox.errors import CollectorError

__all__ = ["StateDB"]

P = ParamSpec("P")
T = TypeVar("T")

# How long a writer waits for another collector process holding the database; a
# daemon and a cron run may overlap for a moment.
BUSY_TIMEOUT_SECONDS: Final = 30.0
# Values in one ``IN (...)`` list: SQLite before 3.32 allows 999 parameters per query.
SQL_IN_CHUNK: Final = 500

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    account      TEXT NOT NULL,
    uid          TEXT NOT NULL,
    size         INTEGER NOT NULL DEFAULT 0,
    sha256       TEXT,
    first_seen   REAL NOT NULL,
    delivered_at REAL,
    deleted_at   REAL,
    quarantined  INTEGER NOT NULL DEFAULT 0,
    skipped      TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    header_uid   TEXT,
    PRIMARY KEY (account, uid)
);
CREATE TABLE IF NOT EXISTS sink_deliveries (
    account      TEXT NOT NULL,
    uid          TEXT NOT NULL,
    sink         TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (account, uid, sink)
);
CREATE TABLE IF NOT EXISTS runs (
    account        TEXT PRIMARY KEY,
    last_start     REAL,
    last_success   REAL,
    last_error     TEXT,
    last_error_at  REAL,
    failures       INTEGER NOT NULL DEFAULT 0,
    on_server      INTEGER NOT NULL DEFAULT 0,
    pending        INTEGER NOT NULL DEFAULT 0,
    login_required INTEGER NOT NULL DEFAULT 0
);
"""


class StateDB:
    """The collector's SQLite state (``CollectorState``); one per process, shared by its
    polls. ``close`` when done (not from the state's own thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Opened here, used only on the worker thread from now on.
            self._db = sqlite3.connect(
                path,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit survives power loss, which "delivered" must.
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
            if "header_uid" not in columns:
                # Databases from before header aliases: add the column, keep the rows.
                self._db.execute("ALTER TABLE messages ADD COLUMN header_uid TEXT")
            runs = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
            if "login_required" not in runs:
                # Databases from before dead OAuth logins were remembered.
                self._db.execute(
                    "ALTER TABLE runs ADD COLUMN login_required INTEGER NOT NULL DEFAULT 0"
                )
        except (OSError, sqlite3.Error) as exc:
            raise CollectorError(f"state database {path}: {exc}") from exc
        # One thread: the FIFO of its queue is the order of the writes.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="popbox-state")
        # "delivered" records waiting for the worker; see record_delivered.
        self._delivered: list[tuple[Sequence[Delivered], Future[None]]] = []
        self._delivered_guard = threading.Lock()

    def close(self) -> None:
        """Finish what was asked, then close the database. Idempotent."""
        self._worker.shutdown(wait=True)
        self._db.close()

    async def _call(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """The one way to the database: run ``work`` on the state's thread."""
        return await self._translated(self._worker.submit(work, *args, **kwargs))

    async def _translated(self, future: Future[T]) -> T:
        try:
            return await asyncio.wrap_future(future)
        except sqlite3.Error as exc:
            raise CollectorError(f"state database {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---------------------------------------------------------------- reading

    async def records(self, account: str) -> dict[str, MessageRecord]:
        return await self._call(self._records, account)

    def _records(self, account: str) -> dict[str, MessageRecord]:
        rows = self._db.execute(
            "SELECT uid, size, sha256, delivered_at, deleted_at, quarantined, skipped,"
            " attempts, last_error FROM messages WHERE account = ?",
            (account,),
        ).fetchall()
        return {
            row[0]: MessageRecord(
                uid=row[0],
                size=row[1],
                sha256=row[2],
                delivered_at=row[3],
                deleted_at=row[4],
                quarantined=bool(row[5]),
                skipped=row[6],
                attempts=row[7],
                last_error=row[8],
            )
            for row in rows
        }

    async def quarantined(self, account: str) -> list[MessageRecord]:
        return [
            record
            for record in (await self.records(account)).values()
            if record.quarantined and record.delivered_at is None
        ]

    async def sinks_done(self, account: str, uids: Iterable[str]) -> dict[str, frozenset[str]]:
        return await self._call(self._sinks_done, account, sorted(set(uids)))

    def _sinks_done(self, account: str, wanted: list[str]) -> dict[str, frozenset[str]]:
        done: dict[str, set[str]] = {}
        # The primary key (account, uid, sink) answers each IN list by index.
        for start in range(0, len(wanted), SQL_IN_CHUNK):
            chunk = wanted[start : start + SQL_IN_CHUNK]
            marks = ",".join("?" * len(chunk))  # placeholders only, never values
            rows = self._db.execute(
                f"SELECT uid, sink FROM sink_deliveries WHERE account = ? AND uid IN ({marks})",  # noqa: S608
                (account, *chunk),
            ).fetchall()
            for uid, sink in rows:
                done.setdefault(uid, set()).add(sink)
        return {uid: frozenset(sinks) for uid, sinks in done.items()}

    async def status(self, accounts: Sequence[str]) -> list[AccountStatus]:
        return await self._call(self._status, list(accounts))

    def _status(self, accounts: list[str]) -> list[AccountStatus]:
        result = []
        for account in accounts:
            run = self._db.execute(
                "SELECT last_success, last_error, last_error_at, failures, pending,"
                " login_required FROM runs WHERE account = ?",
                (account,),
            ).fetchone() or (None, None, None, 0, 0, 0)
            delivered, quarantined = self._db.execute(
                "SELECT COUNT(delivered_at),"
                " COALESCE(SUM(quarantined AND delivered_at IS NULL), 0)"
                " FROM messages WHERE account = ?",
                (account,),
            ).fetchone()
            result.append(
                AccountStatus(
                    account=account,
                    last_success=run[0],
                    last_error=run[1],
                    last_error_at=run[2],
                    failures=run[3],
                    delivered=delivered,
                    quarantined=quarantined,
                    pending=run[4],
                    login_required=bool(run[5]),
                )
            )
        return result

    # ---------------------------------------------------------------- writing

    async def note_listing(self, account: str, entries: Sequence[tuple[str, int]]) -> None:
        if entries:
            await self._call(self._note_listing, account, list(entries))

    def _note_listing(self, account: str, entries: list[tuple[str, int]]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO messages (account, uid, size, first_seen)"
                " VALUES (?, ?, ?, ?)",
                [(account, uid, size, now) for uid, size in entries],
            )

    async def start_attempts(
        self, account: str, entries: Sequence[tuple[str, int]]
    ) -> dict[str, Attempt]:
        # One trip: count, then learn which sinks have each message.
        return await self._call(self._start_attempts, account, list(entries))

    def _start_attempts(self, account: str, entries: list[tuple[str, int]]) -> dict[str, Attempt]:
        # A WAL commit without fsync survives a process crash, which is all the count
        # must; the next FULL commit syncs it along. Only power loss could forget one.
        self._db.execute("PRAGMA synchronous = NORMAL")
        try:
            counts = self._count_attempts(account, entries)
        finally:
            self._db.execute("PRAGMA synchronous = FULL")
        done = self._sinks_done(account, sorted(counts))
        return {uid: Attempt(count, done.get(uid, frozenset())) for uid, count in counts.items()}

    def _count_attempts(self, account: str, entries: list[tuple[str, int]]) -> dict[str, int]:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO messages (account, uid, size, first_seen)"
                " VALUES (?, ?, ?, ?)",
                [(account, uid, size, now) for uid, size in entries],
            )
            db.executemany(
                "UPDATE messages SET attempts = attempts + 1 WHERE account = ? AND uid = ?",
                [(account, uid) for uid, _ in entries],
            )
            counts: dict[str, int] = {}
            for uid, _ in entries:
                row = db.execute(
                    "SELECT attempts FROM messages WHERE account = ? AND uid = ?", (account, uid)
                ).fetchone()
                counts[uid] = int(row[0])
        return counts

    async def record_sinks(self, account: str, entries: Iterable[tuple[str, str]]) -> None:
        await self._call(self._record_sinks, account, list(entries))

    def _record_sinks(self, account: str, entries: list[tuple[str, str]]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO sink_deliveries (account, uid, sink, delivered_at)"
                " VALUES (?, ?, ?, ?)",
                [(account, uid, sink, now) for uid, sink in entries],
            )

    async def record_delivered(self, rows: Sequence[Delivered]) -> None:
        """Group commit: records that reach the state's thread together (from several
        accounts, or batches, at once) share one transaction, one fsync. Each call
        still returns only once its rows are durable, as a commit of its own would."""
        waiter: Future[None] = Future()
        with self._delivered_guard:
            self._delivered.append((rows, waiter))
            first = len(self._delivered) == 1
        if first:
            self._worker.submit(self._commit_delivered)
        await self._translated(waiter)

    def _commit_delivered(self) -> None:
        with self._delivered_guard:
            batch, self._delivered = self._delivered, []
        # A caller cancelled before its turn is not told; its rows are recorded anyway
        # (every sink confirmed them).
        waiters = [waiter for _, waiter in batch if waiter.set_running_or_notify_cancel()]
        try:
            self._record_delivered([row for rows, _ in batch for row in rows])
        except BaseException as exc:
            for waiter in waiters:
                waiter.set_exception(exc)
        else:
            for waiter in waiters:
                waiter.set_result(None)

    def _record_delivered(self, rows: list[Delivered]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO sink_deliveries (account, uid, sink, delivered_at)"
                " VALUES (?, ?, ?, ?)",
                [(row.account, row.uid, row.sink, now) for row in rows if row.sink],
            )
            db.executemany(
                # size stays what LIST said at first sight: the UIDL sanity check
                # compares it with later LISTs, and some servers' LIST sizes are off.
                "UPDATE messages SET delivered_at = ?, sha256 = ?, header_uid = ?,"
                " quarantined = 0, last_error = NULL WHERE account = ? AND uid = ?",
                [(now, row.sha256, row.header_uid, row.account, row.uid) for row in rows],
            )

    async def adopt_header_uids(self, account: str, header_uids: Iterable[str]) -> int:
        return await self._call(self._adopt_header_uids, account, list(header_uids))

    def _adopt_header_uids(self, account: str, header_uids: list[str]) -> int:
        now, adopted = time.time(), 0
        with self._transaction() as db:
            for header_uid in header_uids:
                row = db.execute(
                    "SELECT size, sha256, delivered_at FROM messages WHERE account = ?"
                    " AND header_uid = ? AND delivered_at IS NOT NULL AND uid != ?",
                    (account, header_uid, header_uid),
                ).fetchone()
                if row is None:
                    continue
                cursor = db.execute(
                    "INSERT OR IGNORE INTO messages (account, uid, size, sha256, first_seen,"
                    " delivered_at, header_uid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (account, header_uid, row[0], row[1], now, row[2], header_uid),
                )
                adopted += cursor.rowcount
        return adopted

    async def record_failure(self, account: str, uid: str, error: str) -> None:
        await self._call(
            self._execute,
            "UPDATE messages SET last_error = ? WHERE account = ? AND uid = ?",
            (error[:ERROR_TEXT_MAX], account, uid),
        )

    async def record_quarantined(self, account: str, uid: str, reason: str, sha256: str) -> None:
        await self._call(
            self._execute,
            "UPDATE messages SET quarantined = 1, last_error = ?, sha256 = ?"
            " WHERE account = ? AND uid = ?",
            (reason[:ERROR_TEXT_MAX], sha256, account, uid),
        )

    async def clear_quarantine(self, account: str, uid: str) -> None:
        await self._call(
            self._execute,
            "UPDATE messages SET quarantined = 0, attempts = 0 WHERE account = ? AND uid = ?",
            (account, uid),
        )

    async def record_skipped(self, account: str, uid: str, size: int, reason: str) -> None:
        await self._call(self._record_skipped, account, uid, size, reason)

    def _record_skipped(self, account: str, uid: str, size: int, reason: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO messages (account, uid, size, first_seen)"
                " VALUES (?, ?, ?, ?)",
                (account, uid, size, time.time()),
            )
            db.execute(
                "UPDATE messages SET skipped = ? WHERE account = ? AND uid = ?",
                (reason, account, uid),
            )

    async def record_deleted(self, account: str, uids: Iterable[str]) -> None:
        await self._call(self._record_deleted, account, list(uids))

    def _record_deleted(self, account: str, uids: list[str]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "UPDATE messages SET deleted_at = ? WHERE account = ? AND uid = ?",
                [(now, account, uid) for uid in uids],
            )

    async def run_started(self, account: str) -> None:
        await self._call(
            self._execute,
            "INSERT INTO runs (account, last_start) VALUES (?, ?)"
            " ON CONFLICT (account) DO UPDATE SET last_start = excluded.last_start",
            (account, time.time()),
        )

    async def run_finished(
        self,
        account: str,
        *,
        error: str | None,
        on_server: int = 0,
        pending: int = 0,
        login_required: bool = False,
    ) -> None:
        await self._call(self._run_finished, account, error, on_server, pending, login_required)

    def _run_finished(
        self, account: str, error: str | None, on_server: int, pending: int, login_required: bool
    ) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO runs (account) VALUES (?)", (account,))
            if error is None:
                db.execute(
                    "UPDATE runs SET last_success = ?, failures = 0, on_server = ?,"
                    " pending = ?, login_required = 0 WHERE account = ?",
                    (now, on_server, pending, account),
                )
            else:
                db.execute(
                    "UPDATE runs SET last_error = ?, last_error_at = ?,"
                    " failures = failures + 1, login_required = ? WHERE account = ?",
                    (error[:ERROR_TEXT_MAX], now, int(login_required), account),
                )

    def _execute(self, statement: str, parameters: tuple[object, ...]) -> None:
        """One statement in a transaction of its own."""
        with self._transaction() as db:
            db.execute(statement, parameters)
