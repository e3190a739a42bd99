"""The collector's plug-in point: a sink takes one fetched message durably.

A message is spooled to disk while it is fetched (so big messages never sit in
memory) and handed to each sink of its account as a ``FetchedMessage``. A sink
returns only once the message is durable on its side; it raises
TemporarySinkError (retry later) or PermanentSinkError (quarantine) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["FetchedMessage", "Sink"]


@dataclass(frozen=True, slots=True)
class FetchedMessage:
    """One message downloaded from a remote maildrop.

    ``path`` holds the message as the server sent it, un-dot-stuffed, with CRLF line
    ends. ``sha256`` is the hex digest of those bytes.
    """

    account: str
    uidl: str
    size: int
    sha256: str
    path: Path

    @property
    def idempotency_key(self) -> str:
        """Stable across redeliveries of the same message after a crash."""
        return f"{self.account}:{self.uidl}:{self.sha256}"

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


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
