"""The popbox sink: deliver fetched mail into a local popbox user's maildrop.

The store's ``deliver`` and our record of it cannot be one atomic step, so every
delivery goes through a small SQLite ledger keyed by (sink, idempotency key):

1. ``delivered`` row present -> a redelivery after a crash: skip it.
2. ``pending`` row present -> a previous attempt died between the store write and
   the ledger update. The maildrop is opened (under its lock, deleting nothing) and
   searched for the same content (messages of about the same wire size are hashed
   with line ends normalised); found -> mark delivered, skip.
3. Otherwise write ``pending`` durably, deliver, then write ``delivered``.

So the message is neither lost (the row is written before the store is touched) nor
duplicated (the store is searched whenever the outcome is unknown). The one case not
covered: the owner fetched and deleted the message between the crash and the retry;
then it is delivered again, which errs towards not losing mail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Protocol, runtime_checkable

from popbox.collector.base import FetchedMessage
from popbox.errors import (
    ConfigError,
    InvalidUsername,
    MaildropInUse,
    NoSuchMailbox,
    PermanentSinkError,
    PermanentStoreError,
    QuotaExceeded,
    StoreError,
    TemporarySinkError,
)
from popbox.store.base import MailStore

if TYPE_CHECKING:
    from popbox.collector.config import PopboxSinkSettings
    from popbox.collector.sinks import SinkContext

__all__ = ["DeliveryLedger", "PopboxStoreSink", "create_sink"]

log = logging.getLogger(__name__)

LEDGER_NAME: Final = "popbox-sink.sqlite"
# Several accounts may share the ledger file; a writer waits this long for another's
# transaction (a few fsyncs) before the delivery counts as a temporary failure.
LEDGER_BUSY_TIMEOUT: Final = 30.0
# A stored message may differ from the fetched one only in line ends (CRLF vs LF, a
# final newline added), which changes its wire size by at most this much.
SIZE_SLACK: Final = 2

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS deliveries (
    sink TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered')),
    store_key TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (sink, idempotency_key)
)
"""


@runtime_checkable
class _FileDeliveringStore(Protocol):
    """Stores that can stream a delivery from a file (MaildirStore does)."""

    async def deliver_file(self, user: str, source: BinaryIO) -> str: ...


def normalised_digest(data: bytes) -> str:
    """SHA-256 of ``data`` with CRLF as LF and one final newline, for comparing copies."""
    body = data.replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n"
    return hashlib.sha256(body).hexdigest()


class DeliveryLedger:
    """The (sink, idempotency key) -> state table, one short connection per call."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self._path, timeout=LEDGER_BUSY_TIMEOUT)
        # WAL + FULL: a committed "pending" row survives power loss, which is what
        # makes the store search after a crash trustworthy.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(_SCHEMA)
        return connection

    def state(self, sink: str, key: str) -> str | None:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT state FROM deliveries WHERE sink = ? AND idempotency_key = ?",
                (sink, key),
            ).fetchone()
        return None if row is None else str(row[0])

    def mark(self, sink: str, key: str, state: str, store_key: str | None = None) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO deliveries (sink, idempotency_key, state, store_key, updated_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (sink, idempotency_key) DO UPDATE SET"
                " state = excluded.state, store_key = excluded.store_key,"
                " updated_at = excluded.updated_at",
                (sink, key, state, store_key, time.time()),
            )


def _sink_error(user: str, exc: StoreError) -> TemporarySinkError | PermanentSinkError:
    """Store errors to sink outcomes: what retrying cannot fix goes to quarantine."""
    permanent = isinstance(exc, PermanentStoreError | NoSuchMailbox) or (
        isinstance(exc, QuotaExceeded) and exc.permanent
    )
    text = f"popbox store refused a message for {user}: {exc}"
    return PermanentSinkError(text) if permanent else TemporarySinkError(text)


class PopboxStoreSink:
    """Deliver into ``user``'s maildrop in ``store``, once per idempotency key."""

    def __init__(
        self,
        store: MailStore,
        user: str,
        *,
        ledger_path: Path,
        name: str | None = None,
        owns_store: bool = False,
    ) -> None:
        self._store = store
        self._user = user
        self._ledger = DeliveryLedger(ledger_path)
        self._name = name or f"popbox:{user}"
        self._owns_store = owns_store
        # One delivery at a time per sink: the pending-check must not race a write.
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        if self._owns_store:
            await self._store.close()

    async def deliver(self, message: FetchedMessage) -> None:
        key = message.idempotency_key
        async with self._lock:
            try:
                state = await asyncio.to_thread(self._ledger.state, self._name, key)
                if state == "delivered":
                    log.info("%s: %s already delivered, skipped", self._name, key)
                    return
                if state == "pending" and await self._already_stored(message):
                    await asyncio.to_thread(self._ledger.mark, self._name, key, "delivered")
                    log.info("%s: %s found in the maildrop after a crash", self._name, key)
                    return
                await asyncio.to_thread(self._ledger.mark, self._name, key, "pending")
            except (sqlite3.Error, OSError) as exc:
                raise TemporarySinkError(f"{self._name}: ledger: {exc}") from exc
            store_key = await self._store_message(message)
            try:
                await asyncio.to_thread(
                    self._ledger.mark, self._name, key, "delivered", store_key
                )
            except (sqlite3.Error, OSError) as exc:
                # Stored but not recorded: the row stays pending, so the retry finds
                # the message in the maildrop instead of storing it twice.
                raise TemporarySinkError(f"{self._name}: ledger: {exc}") from exc
            log.info("%s: delivered %s as %s", self._name, key, store_key)

    async def _store_message(self, message: FetchedMessage) -> str:
        try:
            if isinstance(self._store, _FileDeliveringStore):
                with message.path.open("rb") as source:
                    return await self._store.deliver_file(self._user, source)
            data = await asyncio.to_thread(message.read_bytes)
            return await self._store.deliver(self._user, data)
        except InvalidUsername as exc:
            raise PermanentSinkError(f"{self._name}: {exc}") from exc
        except StoreError as exc:
            raise _sink_error(self._user, exc) from exc
        except OSError as exc:
            raise TemporarySinkError(f"{self._name}: cannot read spooled message: {exc}") from exc

    async def _already_stored(self, message: FetchedMessage) -> bool:
        """Whether the maildrop holds this message (opened read-only, deletes nothing)."""
        wanted = normalised_digest(await asyncio.to_thread(message.read_bytes))
        try:
            maildrop = await self._store.open_maildrop(self._user)
        except MaildropInUse as exc:
            # Cannot look while a POP3 session holds it; deciding blind could duplicate.
            raise TemporarySinkError(f"{self._name}: maildrop busy, will retry") from exc
        except StoreError as exc:
            raise _sink_error(self._user, exc) from exc
        try:
            for index, info in enumerate(maildrop.messages):
                if abs(info.size - message.size) > SIZE_SLACK:
                    continue
                data = b"".join([chunk async for chunk in maildrop.read_message(index)])
                if normalised_digest(data) == wanted:
                    return True
            return False
        except StoreError as exc:
            raise _sink_error(self._user, exc) from exc
        finally:
            await maildrop.release()


def create_sink(settings: PopboxSinkSettings, context: SinkContext) -> PopboxStoreSink:
    """Build the sink for ``settings`` (called by popbox.collector.sinks.build_sink)."""
    from popbox.config import load_config
    from popbox.store.maildir import MaildirStore

    # "None = this file": the context may carry the collector's own config path.
    config_path: Path | None = settings.config or getattr(context, "config_path", None)
    if config_path is None:
        raise ConfigError(
            f"sink {settings.label}: set `config` to the popbox server config file"
        )
    config = load_config(config_path)
    store = MaildirStore(config.storage.maildir_root, save_crlf=config.storage.save_crlf)
    return PopboxStoreSink(
        store,
        settings.user,
        ledger_path=context.state_dir / LEDGER_NAME,
        name=settings.label,
        owns_store=True,
    )
