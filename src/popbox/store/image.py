"""A folder as a whole, for moving a mailbox between stores (``popbox migrate``) and,
later, for backups: every message with its UID, arrival time and kept UIDL, the
folder's UIDVALIDITY and next UID, and its device state.

Every store that can be a source or a target of a move keeps the same numbering:
a message's store id is its UID in the folder (only growing, never reused), and a
UIDL in the store's own form is ``f"{uidvalidity:08x}{uid:08x}"``. A folder moved
with its UIDVALIDITY, UIDs and state is therefore the same folder for every client
and device: the same UIDLs, the same message numbers, the same deletions and
retrievals per device. Nothing is re-downloaded and no device forgets anything.

A source is read under the folder's lock (a session gets ``[IN-USE]`` meanwhile),
so the image is of one moment. ``restore_image`` makes the target folder equal to
the image: messages whose UID it holds already are not copied again (a killed move
resumes where it stopped), messages it holds that the image lacks are removed, and
the UIDVALIDITY, next UID and device state are set last, in one durable step. Until
that step the target folder is not served as finished (the store's business how:
PostgreSQL keeps it in one transaction or behind a flag, Maildir writes its index
last), so nobody ever sees a half-moved folder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "FolderImage",
    "ImageMessage",
    "ImageSource",
    "ImageStore",
    "ReadBody",
    "RestoreReport",
    "own_uidl",
]


def own_uidl(uidvalidity: int, uid: int) -> str:
    """The UIDL a store serves for ``uid`` unless the message keeps another."""
    return f"{uidvalidity:08x}{uid:08x}"


@dataclass(frozen=True, slots=True)
class ImageMessage:
    """One message of a folder image."""

    uid: int
    """Its store id in the folder: UIDs only grow and are never reused."""
    size: int
    """Its wire size (store.base.MessageInfo)."""
    arrived: float
    """When it arrived in this folder (seconds since the epoch): recent mode and the
    Trash age count from it."""
    kept_uidl: str | None = None
    """The UIDL kept from a server popbox replaced; None: the store's own form."""


@dataclass(frozen=True, slots=True)
class FolderImage:
    """Everything a client and the mailbox rules can see of one folder."""

    user: str
    folder: str
    uidvalidity: int
    next_uid: int
    """Greater than every UID the folder ever gave, those of deleted mail included."""
    messages: Sequence[ImageMessage]
    """Oldest first (by UID)."""
    state: bytes
    """The device state (store.devices.FolderState.to_bytes); b"" for none."""


# The stored bytes of the message with this UID, in bounded chunks.
ReadBody = Callable[[int], AsyncIterator[bytes]]


@dataclass(slots=True)
class RestoreReport:
    """What ``restore_image`` did to the target folder."""

    copied: int = 0
    skipped: int = 0
    """Messages the target held already (an earlier, interrupted restore)."""
    removed: int = 0
    """Messages the target held that the image lacks."""
    octets: int = 0
    notes: list[str] = field(default_factory=list)


class ImageSource(Protocol):
    """A folder held under its lock while it is read whole."""

    @property
    def image(self) -> FolderImage: ...

    def read(self, uid: int) -> AsyncIterator[bytes]:
        """The stored bytes of message ``uid`` (StoreError if it vanished)."""
        ...

    async def close(self) -> None:
        """Release the folder's lock. Safe to call more than once."""
        ...


class ImageStore(Protocol):
    """A store a mailbox can be moved out of and into."""

    async def open_image(self, user: str, folder: str) -> ImageSource:
        """Lock the folder like a session would and read its image. MaildropInUse
        if a session holds it, NoSuchFolder if it does not exist."""
        ...

    async def restore_image(self, image: FolderImage, read: ReadBody) -> RestoreReport:
        """Make the folder ``image.folder`` of ``image.user`` equal to ``image``
        (created if missing), durably, under its lock (MaildropInUse if a session
        holds it). Idempotent and resumable: see the module's docstring."""
        ...

    async def remove_folder(self, user: str, folder: str) -> None:
        """Remove the folder and all it holds, under its lock (after a move)."""
        ...
