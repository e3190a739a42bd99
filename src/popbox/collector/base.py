"""The collector's plug-in point: a sink takes one fetched message durably.

A message is spooled to disk while it is fetched (so big messages never sit in
memory) and handed to each sink of its account as a ``FetchedMessage``. A sink
returns only once the message is durable on its side; it raises
TemporarySinkError (retry later) or PermanentSinkError (quarantine) otherwise.
A sink that can make many messages durable at once for the price of one (a Maildir:
one directory fsync for the lot) also offers ``deliver_batch`` (``BatchSink``).

The collector never opens a local popbox maildrop itself: the popbox sink is handed a
``LocalDelivery`` (the server's Deliverer) by the composition root, through a
``LocalDeliveryFactory`` in the sink context.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = [
    "BatchSink",
    "DeliveryReceipt",
    "FetchedMessage",
    "LocalDelivery",
    "LocalDeliveryFactory",
    "LocalDeliveryHandle",
    "Sink",
]


@dataclass(frozen=True, slots=True)
class FetchedMessage:
    """One message downloaded from a remote maildrop.

    ``path`` holds the message as the server sent it, un-dot-stuffed, with CRLF line
    ends. ``sha256`` is the hex digest of those bytes. For a batch sink, a small
    message may come in ``data`` instead (the same bytes, kept in memory); ``path``
    then exists only once the poll engine wrote it out for a sink that reads files.
    """

    account: str
    uidl: str
    size: int
    sha256: str
    path: Path
    data: bytes | None = None
    attempt: int = 1
    """Which delivery attempt this is, counted durably before any sink runs. Above 1,
    an earlier attempt may have reached the sink just before the collector was
    killed: a sink that cannot tell a repeated ``idempotency_key`` from its own
    files (IMAP, the Gmail API) looks the message up before taking it again."""

    @property
    def idempotency_key(self) -> str:
        """Stable across redeliveries of the same message after a crash."""
        return f"{self.account}:{self.uidl}:{self.sha256}"

    def read_bytes(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


class Sink(Protocol):
    """Somewhere a fetched message goes: a Maildir, a command, a webhook, ..."""

    @property
    def name(self) -> str:
        """A short label for logs and `popbox fetch --status` (e.g. ``maildir:/srv/x``)."""
        ...

    async def deliver(self, message: FetchedMessage) -> None:
        """Take the message durably, or raise TemporarySinkError/PermanentSinkError.

        Delivering the same ``idempotency_key`` twice must not create a duplicate
        where the sink can tell (Maildir, mbox, popbox mailbox); where it cannot
        (command, webhook) the key is passed on so the receiver can.
        """
        ...

    async def close(self) -> None: ...


@runtime_checkable
class BatchSink(Sink, Protocol):
    """A sink that takes several messages durably together, cheaper than one by one.

    ``deliver_batch`` returns only once every message is durable. It raises on any
    failure, and may then have taken some of the messages (durably or not): the poll
    engine offers each message of a failed batch again, alone, with the same
    ``idempotency_key``, so a batch sink must recognise keys it already holds, and a
    repeated key must be made durable before it is reported as taken.
    """

    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> None: ...


class DeliveryReceipt(Protocol):
    """What a local delivery reports: the store's key for the stored message."""

    @property
    def key(self) -> str: ...


class LocalDelivery(Protocol):
    """Delivery into this machine's popbox maildrops by the server's delivery rules.

    popbox's ``Deliverer`` is one: recipient mapping, size limit, quota and trace
    headers apply exactly as for LMTP and ``popbox deliver``. Verdicts are popbox
    errors: UnknownRecipient, MessageTooBig, QuotaExceeded (``permanent`` per
    ``quota.over_quota``) and TemporaryDeliveryError (its cause a
    PermanentStoreError when retrying cannot help).
    """

    async def deliver_file(
        self, recipient: str, sender: str | None, path: Path
    ) -> DeliveryReceipt:
        """Store the message in ``path`` durably for ``recipient``; ``sender`` is the
        envelope sender if known (POP3 gives none)."""
        ...

    async def archive_file(self, recipient: str, path: Path) -> DeliveryReceipt:
        """Keep the message in ``path`` in ``recipient``'s archive, durably (the archive
        sink); keeping the same message again stores nothing twice."""
        ...

    async def holds(self, recipient: str, sender: str | None, path: Path) -> bool:
        """Whether ``recipient``'s maildrop already holds the message as
        ``deliver_file`` would have stored it (trace headers included); raises
        MaildropInUse while a POP3 session holds the maildrop."""
        ...


@dataclass(frozen=True, slots=True)
class LocalDeliveryHandle:
    """A LocalDelivery and how to close what it was built on (the store)."""

    delivery: LocalDelivery
    close: Callable[[], Awaitable[None]]


# Given the popbox server config file a popbox sink names, its local delivery.
LocalDeliveryFactory = Callable[[Path], LocalDeliveryHandle]
