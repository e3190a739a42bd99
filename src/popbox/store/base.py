"""The storage plug-in point: what a mail store and one locked maildrop must offer.

A maildrop follows POP3's lifecycle (RFC 1939 section 8 and DESIGN.md): opening it
takes an exclusive lock and a snapshot; bodies stream from the snapshot; deletions
are committed only by ``commit_deletions`` (POP3's UPDATE state) and must be durable
before it returns; ``release`` ends the session without deleting anything.

A maildrop is one folder of a user's mailbox as one device sees it (store.mailbox):
the snapshot leaves out what that device deleted, and a commit records the device's
deletions and removes, per the policy's disposition, what no holding device wants
any more (store.devices has the rules). With one device and the DELETE disposition
that is exactly RFC 1939.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

from popbox.store.mailbox import (
    DEFAULT_VIEW,
    INBOX,
    DeviceReport,
    MailboxPolicy,
    MailboxView,
    SweepReport,
)

__all__ = ["MailStore", "Maildrop", "MessageInfo", "MessageTable", "Usage", "WireReadyFile"]


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a maildrop snapshot.

    ``uidl`` is assigned once when the store first sees the message and never changes
    (1-70 printable ASCII characters, 0x21-0x7E, RFC 1939 section 7). ``size`` is the
    wire size: the octets RETR sends before dot-stuffing, with every line ending as
    CRLF and a final CRLF present (RFC 1939 section 11).
    """

    uidl: str
    size: int


class MessageTable(Sequence[MessageInfo]):
    """A snapshot kept as two columns: a MessageInfo is only made when asked for.

    A store that holds UIDLs and sizes as columns hands them over as they are; the
    protocol core reads ``uidls`` and ``sizes`` directly, so a login on 100,000
    messages makes no per-message object. ``uidls_checked`` is the store's promise
    that every UIDL is 1-70 printable ASCII octets without spaces (it made them so),
    which spares the core its own check. ``rendered`` is where the core may keep the
    listings it rendered from this table: the table lives as long as its index
    version, so every session of that version reuses them. Nobody changes the
    columns after construction.
    """

    __slots__ = ("rendered", "sizes", "uidls", "uidls_checked")

    def __init__(
        self, uidls: Sequence[str], sizes: Sequence[int], *, uidls_checked: bool = False
    ) -> None:
        self.uidls = uidls
        self.sizes = sizes
        self.uidls_checked = uidls_checked
        self.rendered: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self.sizes)  # uidls may be made on first use; sizes are at hand

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MessageTable):
            return list(self.uidls) == list(other.uidls) and list(self.sizes) == list(other.sizes)
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compared by content, like a list

    @overload
    def __getitem__(self, index: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[MessageInfo]: ...

    def __getitem__(self, index: int | slice) -> MessageInfo | Sequence[MessageInfo]:
        if isinstance(index, slice):
            return [
                MessageInfo(u, s) for u, s in zip(self.uidls[index], self.sizes[index], strict=True)
            ]
        return MessageInfo(self.uidls[index], self.sizes[index])


@dataclass(frozen=True, slots=True)
class Usage:
    """How much a user's maildrop holds, for quotas and `popbox user list`."""

    messages: int
    octets: int


class WireReadyFile:
    """A stored message whose bytes are already its wire form, but for dot-stuffing.

    CRLF line ends throughout and a final CRLF (or empty), so ``size`` equals the
    snapshot's wire size: the server may send the file with ``os.sendfile`` and only
    insert the stuffing dots. It owns ``fd``, open for reading: whoever receives it
    closes it with ``close()`` or a ``with`` block (closing twice is harmless), and
    never closes ``fd`` itself.
    """

    __slots__ = ("_fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

    @property
    def fd(self) -> int:
        """The open descriptor; ValueError once the file is closed."""
        if self._fd < 0:
            raise ValueError("wire-ready file is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> WireReadyFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WireReadyFile(fd={self._fd}, size={self.size})"


class Maildrop(Protocol):
    """One user's maildrop, locked for one POP3 session.

    Indexes are 0-based positions in ``messages`` and stay valid until ``release``.
    """

    @property
    def user(self) -> str: ...

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken when the maildrop was opened, oldest first."""
        ...

    def read_message(self, index: int) -> AsyncIterator[bytes]:
        """Stream the stored bytes of one message in bounded chunks.

        The bytes are the message as stored (bare LF or CRLF line ends); the caller
        turns them into wire form. Raises StoreError if the message vanished.
        """
        ...

    async def open_wire_ready(self, index: int) -> WireReadyFile | None:
        """The message as an open file if its stored bytes are wire-ready, else None.

        None means "stream it through read_message": mail stored with LF line ends or
        without a final line end, or a store that does not keep files. The caller owns
        the file and closes it (``with``). Raises StoreError if the message vanished.
        """
        ...

    def mark_retrieved(self, index: int) -> None:
        """Note that the session sent message ``index`` whole (RETR).

        Kept in memory; ``commit_deletions`` and ``release`` record it where a
        retention counts from the first retrieval (RFC 2449 EXPIRE). With a
        retention of 0 days a retrieved message counts as deleted at QUIT.
        """
        ...

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        """Delete these messages for this device durably, then release the lock.

        Returns only once the deletions survive a crash: this device never sees them
        again, and whatever no holding device wants any more is removed per the
        policy's disposition. On failure raises StoreError and the lock is still
        released.
        """
        ...

    async def release(self) -> None:
        """Release the lock without deleting anything. Safe to call more than once."""
        ...


class MailStore(Protocol):
    """Where mailboxes live. One instance serves every user."""

    async def open_maildrop(self, user: str, view: MailboxView = DEFAULT_VIEW) -> Maildrop:
        """Lock one folder of the user's mailbox and snapshot it as ``view`` sees it.

        Notes the device's login (LOGIN-DELAY, activity). Creates an empty INBOX for a
        user who has none. Raises MaildropInUse if another session (in any process)
        holds the folder, NoSuchFolder for a folder that does not exist,
        LoginTooSoon inside the device's login delay, TooManyDevices, StoreError on
        other failures.
        """
        ...

    async def deliver(
        self,
        user: str,
        message: bytes,
        *,
        folder: str = INBOX,
        uidl: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        """Store one message durably for ``user``; return the store's key for it (logs).

        The UIDL is assigned when a session first sees the message (under the
        maildrop lock), so delivery never waits for a session. Returns only once the
        message survives a crash. Never blocks on a POP3
        session's lock: delivery and sessions run side by side. A session that is
        open sees the message at its next login. A folder that does not exist yet
        is created.

        ``uidl``: the UIDL the server popbox replaces served for this message; the
        message keeps it for ever (its crash-safety is the message's). InvalidUidl
        unless RFC 1939 allows it (mailbox.check_uidl). Keeping UIDLs unique in a
        folder is the caller's job, but no snapshot serves one UIDL twice: the
        message with the lowest UID keeps it, and a later one, or one whose UIDL is
        in the store's own form, gets the store's own UIDL (a WARNING is logged).

        ``delivery_id``: what makes this delivery recognisable when it comes again (an
        MTA's retry after the reply was lost; delivery.deliverer makes it from the
        message as received). A store that records them stores nothing for an id it
        saw for ``user`` within its duplicate window and returns the first key
        (logged at INFO); a store that does not (Maildir) ignores it.
        """
        ...

    async def folders(self, user: str) -> list[str]:
        """The user's folders: INBOX first, then the others by name."""
        ...

    async def devices(self, user: str) -> list[DeviceReport]:
        """Every device of every folder of the user (``popbox user show``)."""
        ...

    async def forget_device(self, user: str, device: str) -> int:
        """Drop ``device`` from every folder, releasing what it held; returns in how
        many folders it was known. Raises MaildropInUse if a session holds one of
        them (nothing is changed then in that folder)."""
        ...

    async def sweep(
        self, user: str, policy: MailboxPolicy, *, now: float | None = None
    ) -> SweepReport:
        """Remove, per ``policy``, what may go in each folder of the user's mailbox:
        messages every holding device deleted, expired retention, hidden messages
        whose time is up, and Trash older than ``trash_days``. A folder a session
        holds is skipped and named in the report."""
        ...

    async def usage(self, user: str) -> Usage:
        """Messages and octets currently stored for ``user`` (without locking)."""
        ...

    async def close(self) -> None:
        """Release whatever the store holds (connections, thread pools)."""
        ...
