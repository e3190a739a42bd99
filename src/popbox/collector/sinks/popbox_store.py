"""The popbox sink: deliver fetched mail into a local popbox user's maildrop.

The message goes through the popbox server's own delivery rules (a ``LocalDelivery``
handed in by the composition root: the server's Deliverer), as if it had come over
LMTP: recipient mapping, size limit, quota, and a ``Delivered-To`` trace header. POP3
carries no envelope sender, so no Return-Path is added; the one the message got at its
first delivery stays. Verdicts become sink outcomes: no such user, too big, over a
permanent quota or a store that cannot take it -> PermanentSinkError (quarantine);
over a temporary quota or any fault that may pass -> TemporarySinkError.

The delivery and our record of it cannot be one atomic step, so every delivery goes
through a small SQLite ledger keyed by (sink, idempotency key):

1. ``delivered`` row present -> a redelivery after a crash: skip it.
2. ``pending`` row present -> a previous attempt died between the store write and
   the ledger update. The Deliverer searches the maildrop (under its lock, deleting
   nothing) for the message as it would have stored it, trace headers included;
   found -> mark delivered, skip.
3. Otherwise write ``pending`` durably, deliver, then write ``delivered``.

So the message is neither lost (the row is written before the store is touched) nor
duplicated (the store is searched whenever the outcome is unknown). The one case not
covered: the owner fetched and deleted the message between the crash and the retry;
then it is delivered again, which errs towards not losing mail.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Final

from popbox.collector.base import FetchedMessage, LocalDelivery
from popbox.errors import (
    MaildropInUse,
    MessageTooBig,
    NoSuchMailbox,
    PermanentSinkError,
    PermanentStoreError,
    PopboxError,
    QuotaExceeded,
    TemporaryDeliveryError,
    TemporarySinkError,
    UnknownRecipient,
)

if TYPE_CHECKING:
    from popbox.collector.config import PopboxSinkSettings
    from popbox.collector.sinks import SinkContext

__all__ = ["DeliveryLedger", "PopboxStoreSink", "create_sink"]

log = logging.getLogger(__name__)

LEDGER_NAME: Final = "popbox-sink.sqlite"
# Several accounts may share the ledger file; a writer waits this long for another's
# transaction (a few fsyncs) before the delivery counts as a temporary failure.
LEDGER_BUSY_TIMEOUT: Final = 30.0
# The envelope sender handed to the delivery: POP3 does not carry one.
UNKNOWN_SENDER: Final = None

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


def _sink_error(name: str, exc: PopboxError) -> TemporarySinkError | PermanentSinkError:
    """Delivery verdicts to sink outcomes: what retrying cannot fix goes to quarantine."""
    cause = exc.__cause__ if isinstance(exc, TemporaryDeliveryError) else exc
    permanent = (
        isinstance(exc, UnknownRecipient | MessageTooBig)
        or isinstance(cause, PermanentStoreError | NoSuchMailbox)
        or (isinstance(exc, QuotaExceeded) and exc.permanent)
    )
    reason = "over quota" if isinstance(exc, QuotaExceeded) else "popbox refused the message"
    text = f"{name}: {reason}: {exc}"
    return PermanentSinkError(text) if permanent else TemporarySinkError(text)


class PopboxStoreSink:
    """Deliver to ``user`` through ``delivery``, once per idempotency key."""

    def __init__(
        self,
        delivery: LocalDelivery,
        user: str,
        *,
        ledger_path: Path,
        name: str | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``user`` is a recipient as LMTP would take it (mapped to a popbox user);
        ``on_close`` releases what ``delivery`` was built on."""
        self._delivery = delivery
        self._user = user
        self._ledger = DeliveryLedger(ledger_path)
        self._name = name or f"popbox:{user}"
        self._on_close = on_close
        # One delivery at a time per sink: the pending-check must not race a write.
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        if self._on_close is not None:
            await self._on_close()

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
            receipt = await self._delivery.deliver_file(
                self._user, UNKNOWN_SENDER, message.path
            )
        except PopboxError as exc:
            raise _sink_error(self._name, exc) from exc
        except OSError as exc:
            raise TemporarySinkError(f"{self._name}: cannot deliver: {exc}") from exc
        return receipt.key

    async def _already_stored(self, message: FetchedMessage) -> bool:
        """Whether the maildrop holds this message (searched read-only by the delivery)."""
        try:
            return await self._delivery.holds(self._user, UNKNOWN_SENDER, message.path)
        except MaildropInUse as exc:
            # Cannot look while a POP3 session holds it; deciding blind could duplicate.
            raise TemporarySinkError(f"{self._name}: maildrop busy, will retry") from exc
        except PopboxError as exc:
            raise _sink_error(self._name, exc) from exc
        except OSError as exc:
            raise TemporarySinkError(f"{self._name}: cannot search the maildrop: {exc}") from exc


def create_sink(settings: PopboxSinkSettings, context: SinkContext) -> PopboxStoreSink:
    """Build the sink for ``settings`` (called by popbox.collector.sinks.build_sink)."""
    handle = context.local_delivery_for(settings.label, settings.config)
    return PopboxStoreSink(
        handle.delivery,
        settings.user,
        ledger_path=context.state_dir / LEDGER_NAME,
        name=settings.label,
        on_close=handle.close,
    )
