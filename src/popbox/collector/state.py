"""The collector's memory: which remote messages were seen, delivered, deleted, quarantined.

One SQLite database (WAL, ``synchronous = FULL``) keyed by (account, uid), where uid is
the server's UIDL or, for servers whose UIDLs cannot be trusted, ``hdr:`` and a hash of
the message headers. Every change commits at once, per message: a run killed at any
moment loses at most the message in hand, which the next run redelivers (and the
per-sink record below lets sinks that already have it skip it).

``sink_deliveries`` records, per message, which sinks confirmed it: a message is
delivered only when every sink of its account confirmed, and a sink that already did
is skipped when the message is offered again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from popbox.errors import CollectorError

__all__ = ["AccountStatus", "Delivered", "DeliveryRecorder", "MessageRecord", "StateDB"]

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
    pending        INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True, slots=True)
class Delivered:
    """One "delivered" record for ``record_delivered_many``."""

    account: str
    uid: str
    sha256: str
    sink: str | None = None
    """The last sink's confirmation, recorded in the same transaction."""
    header_uid: str | None = None


class DeliveryRecorder:
    """Group commit: concurrent deliveries that finish together share one transaction
    (one fsync). ``record`` returns only once the record is durable, exactly like a
    commit of its own, so the exactly-once argument is unchanged."""

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self._waiting: list[tuple[Delivered, asyncio.Future[None]]] = []
        self._flushing = False

    async def record(self, row: Delivered) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await asyncio.to_thread(
                        self._db.record_delivered_many, [row for row, _ in batch]
                    )
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._flushing = False


@dataclass(frozen=True, slots=True)
class MessageRecord:
    uid: str
    size: int
    sha256: str | None
    delivered_at: float | None
    deleted_at: float | None
    quarantined: bool
    skipped: str | None
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class AccountStatus:
    account: str
    last_success: float | None
    last_error: str | None
    last_error_at: float | None
    failures: int
    delivered: int
    quarantined: int
    pending: int


class StateDB:
    """The collector's SQLite state; one instance per process, used from one thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Used from the event loop and from worker threads (the poll's hot path
            # commits off the loop), always under self._lock.
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
        except (OSError, sqlite3.Error) as exc:
            raise CollectorError(f"state database {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield from self._transaction()

    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CollectorError(f"state database {self.path}: {exc}") from exc

    # ---------------------------------------------------------------- reading

    def records(self, account: str) -> dict[str, MessageRecord]:
        with self._lock:
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

    def sinks_done(self, account: str, uid: str) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sink FROM sink_deliveries WHERE account = ? AND uid = ?", (account, uid)
            ).fetchall()
        return {row[0] for row in rows}

    def quarantined(self, account: str) -> list[MessageRecord]:
        return [
            record
            for record in self.records(account).values()
            if record.quarantined and record.delivered_at is None
        ]

    def status(self, accounts: Iterable[str]) -> list[AccountStatus]:
        result = []
        for account in accounts:
            run = self._db.execute(
                "SELECT last_success, last_error, last_error_at, failures, pending"
                " FROM runs WHERE account = ?",
                (account,),
            ).fetchone() or (None, None, None, 0, 0)
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
                )
            )
        return result

    # ---------------------------------------------------------------- writing

    def note_listing(self, account: str, entries: Iterable[tuple[str, int]]) -> None:
        """Remember (uid, LIST size) of messages seen for the first time, in one commit."""
        now = time.time()
        rows = [(account, uid, size, now) for uid, size in entries]
        if not rows:
            return
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO messages (account, uid, size, first_seen)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )

    async def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a method in a worker thread, so commits (fsync) do not stall the loop."""
        return await asyncio.to_thread(method, *args, **kwargs)

    def start_attempt(self, account: str, uid: str, size: int) -> int:
        """Count one more delivery attempt (before any sink runs); return the count.

        The count guards against a message that kills the collector, a process crash:
        a WAL commit without fsync survives that, so this commit skips the fsync (the
        next FULL commit syncs it along). Only power loss could forget an attempt.
        """
        return self.start_attempts(account, [(uid, size)])[uid]

    def start_attempts(self, account: str, entries: Sequence[tuple[str, int]]) -> dict[str, int]:
        """``start_attempt`` for a batch of (uid, size), in one commit; uid -> count."""
        with self._lock:
            self._db.execute("PRAGMA synchronous = NORMAL")
            try:
                return self._count_attempts(account, entries)
            finally:
                self._db.execute("PRAGMA synchronous = FULL")

    def _count_attempts(self, account: str, entries: Sequence[tuple[str, int]]) -> dict[str, int]:
        now = time.time()
        with self._write() as db:
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

    def sinks_done_many(self, account: str, uids: Iterable[str]) -> dict[str, set[str]]:
        """``sinks_done`` for several uids: uid -> sinks (only uids some sink has)."""
        wanted = sorted(set(uids))
        done: dict[str, set[str]] = {}
        with self._lock:
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
        return done

    def record_sinks(self, account: str, entries: Iterable[tuple[str, str]]) -> None:
        """Several (uid, sink) confirmations in one commit."""
        now = time.time()
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO sink_deliveries (account, uid, sink, delivered_at)"
                " VALUES (?, ?, ?, ?)",
                [(account, uid, sink, now) for uid, sink in entries],
            )

    def record_sink(self, account: str, uid: str, sink: str) -> None:
        self.record_sinks(account, [(uid, sink)])

    def record_delivered(
        self,
        account: str,
        uid: str,
        size: int,
        sha256: str,
        *,
        sink: str | None = None,
        header_uid: str | None = None,
    ) -> None:
        """Mark the message delivered; with ``sink``, record that sink's confirmation in
        the same transaction (one fsync for the common single-sink case)."""
        self.record_delivered_many([Delivered(account, uid, sha256, sink, header_uid)])

    def record_delivered_many(self, rows: Sequence[Delivered]) -> None:
        """Several messages delivered, in one transaction: one fsync for all."""
        now = time.time()
        with self._write() as db:
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

    def adopt_header_uids(self, account: str, header_uids: Iterable[str]) -> int:
        """For header-hash uids not yet known, copy the delivered state of a message
        delivered earlier under a server UIDL with the same headers; return how many.

        So a server whose UIDLs turn bad (or change) does not make every message it
        already delivered look new the moment the collector falls back to hashes.
        """
        now, adopted = time.time(), 0
        with self._write() as db:
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

    def record_failure(self, account: str, uid: str, error: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE messages SET last_error = ? WHERE account = ? AND uid = ?",
                (error[:1000], account, uid),
            )

    def record_quarantined(self, account: str, uid: str, reason: str, sha256: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE messages SET quarantined = 1, last_error = ?, sha256 = ?"
                " WHERE account = ? AND uid = ?",
                (reason[:1000], sha256, account, uid),
            )

    def clear_quarantine(self, account: str, uid: str) -> None:
        """Re-offer a quarantined message: it gets a fresh retry budget."""
        with self._write() as db:
            db.execute(
                "UPDATE messages SET quarantined = 0, attempts = 0 WHERE account = ? AND uid = ?",
                (account, uid),
            )

    def record_skipped(self, account: str, uid: str, size: int, reason: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO messages (account, uid, size, first_seen)"
                " VALUES (?, ?, ?, ?)",
                (account, uid, size, time.time()),
            )
            db.execute(
                "UPDATE messages SET skipped = ? WHERE account = ? AND uid = ?",
                (reason, account, uid),
            )

    def record_deleted(self, account: str, uids: Iterable[str]) -> None:
        now = time.time()
        with self._write() as db:
            db.executemany(
                "UPDATE messages SET deleted_at = ? WHERE account = ? AND uid = ?",
                [(now, account, uid) for uid in uids],
            )

    def run_started(self, account: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (account, last_start) VALUES (?, ?)"
                " ON CONFLICT (account) DO UPDATE SET last_start = excluded.last_start",
                (account, time.time()),
            )

    def run_finished(
        self, account: str, *, error: str | None, on_server: int = 0, pending: int = 0
    ) -> None:
        now = time.time()
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO runs (account) VALUES (?)", (account,))
            if error is None:
                db.execute(
                    "UPDATE runs SET last_success = ?, failures = 0, on_server = ?,"
                    " pending = ? WHERE account = ?",
                    (now, on_server, pending, account),
                )
            else:
                db.execute(
                    "UPDATE runs SET last_error = ?, last_error_at = ?,"
                    " failures = failures + 1 WHERE account = ?",
                    (error[:1000], now, account),
                )
