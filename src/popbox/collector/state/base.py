"""What a poll needs of the collector's memory: the ``CollectorState`` protocol and its records.

The state is keyed by (account, uid), where uid is the server's UIDL or, for servers
whose UIDLs cannot be trusted, ``hdr:`` and a hash of the message headers. Every
method that changes something returns only once the change is durable (except where
its docstring says otherwise): the exactly-once order of a poll (see
``popbox.collector.poll``) leans on that. ``sink_deliveries`` (``record_sinks``,
``sinks_done``) records, per message, which sinks confirmed it: a message is delivered
only when every sink of its account confirmed, and a sink that already did is skipped
when the message is offered again.

Implementations: ``StateDB`` (SQLite, the real one) and ``MemoryState`` (tests); both
pass tests/collector/test_state_contract.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["AccountStatus", "Attempt", "CollectorState", "Delivered", "MessageRecord"]

# Error texts kept per message and per run: enough to read, bounded in the database.
ERROR_TEXT_MAX: Final = 1000


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
    login_required: bool = False
    """The last run failed because an OAuth login needs signing in again."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """A delivery attempt just counted: how many there were, and which sinks already
    confirmed the message (they are skipped)."""

    count: int
    sinks_done: frozenset[str]


@dataclass(frozen=True, slots=True)
class Delivered:
    """One "delivered" record for ``record_delivered``."""

    account: str
    uid: str
    sha256: str
    sink: str | None = None
    """The last sink's confirmation, recorded in the same transaction."""
    header_uid: str | None = None


class CollectorState(Protocol):
    """The collector's memory of remote messages and of its runs, per account."""

    # ---------------------------------------------------------------- reading

    async def records(self, account: str) -> dict[str, MessageRecord]:
        """Every message known for ``account``, by uid."""
        ...

    async def quarantined(self, account: str) -> list[MessageRecord]:
        """Messages in quarantine and not delivered since."""
        ...

    async def sinks_done(self, account: str, uids: Iterable[str]) -> dict[str, frozenset[str]]:
        """uid -> the sinks that confirmed it (only uids some sink has)."""
        ...

    async def status(self, accounts: Sequence[str]) -> list[AccountStatus]:
        """One line per account for ``popbox fetch --status``, in the order given."""
        ...

    # ---------------------------------------------------------------- one poll

    async def note_listing(self, account: str, entries: Sequence[tuple[str, int]]) -> None:
        """Remember (uid, LIST size) of messages seen for the first time; a message
        already known keeps the size of its first sighting."""
        ...

    async def adopt_header_uids(self, account: str, header_uids: Iterable[str]) -> int:
        """For header-hash uids not yet known, copy the delivered state of a message
        delivered earlier under a server UIDL with the same headers; return how many.

        So a server whose UIDLs turn bad (or change) does not make every message it
        already delivered look new the moment the collector falls back to hashes.
        """
        ...

    async def start_attempts(
        self, account: str, entries: Sequence[tuple[str, int]]
    ) -> dict[str, Attempt]:
        """Count one more delivery attempt for each (uid, size), before any sink runs.

        The count guards against a message that kills the collector, a process crash;
        it need not survive power loss (the SQLite state skips that fsync).
        """
        ...

    async def record_sinks(self, account: str, entries: Iterable[tuple[str, str]]) -> None:
        """(uid, sink) confirmations."""
        ...

    async def record_delivered(self, rows: Sequence[Delivered]) -> None:
        """Messages delivered to every sink (each with its last sink's confirmation);
        clears their quarantine mark and last error. Known messages only."""
        ...

    async def record_failure(self, account: str, uid: str, error: str) -> None: ...

    async def record_quarantined(
        self, account: str, uid: str, reason: str, sha256: str
    ) -> None: ...

    async def clear_quarantine(self, account: str, uid: str) -> None:
        """Re-offer a quarantined message: it gets a fresh retry budget."""
        ...

    async def record_skipped(self, account: str, uid: str, size: int, reason: str) -> None: ...

    async def record_deleted(self, account: str, uids: Iterable[str]) -> None:
        """The server committed these deletions (after QUIT's +OK)."""
        ...

    async def run_started(self, account: str) -> None: ...

    async def run_finished(
        self,
        account: str,
        *,
        error: str | None,
        on_server: int = 0,
        pending: int = 0,
        login_required: bool = False,
    ) -> None:
        """End of a poll: a success resets the failure count, an error adds one.
        ``login_required`` (the error is a dead OAuth login) is kept until the next
        run ends, for ``--status``."""
        ...
