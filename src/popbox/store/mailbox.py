"""The mailbox model's names: folders, devices, views and the policy for removal.

A user's mailbox holds folders (INBOX and Maildir++ subfolders such as Trash). Each
folder is read by devices: a login names one (``alice~phone``) or is the default
device. A device sees every message of the folder that it has not deleted itself; a
DELE committed by QUIT hides the message from that device only. The message really
goes when every *active* device (one that logged in within ``active_days``) has
deleted it, or when retention expires, and then what happens to it is the folder's
disposition: deleted, moved to Trash or Archive, or hidden and kept for some days.
A recent-mode login sees the last ``recent_days`` of mail whatever the other devices
did, and holds nothing back from removal. docs/mailbox-model.md tells the whole
story; store.devices keeps the per-folder state the rules run on.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from popbox.errors import InvalidMailboxName, InvalidUidl

__all__ = [
    "ARCHIVE",
    "DAY",
    "DEFAULT_DEVICE",
    "DEFAULT_VIEW",
    "INBOX",
    "INSPECT_VIEW",
    "MAX_DEVICE_NAME",
    "MAX_FOLDER_NAME",
    "MAX_UIDL_LENGTH",
    "TRASH",
    "AdoptReport",
    "DeviceReport",
    "Disposition",
    "MailboxPolicy",
    "MailboxView",
    "SweepReport",
    "check_device_name",
    "check_folder_name",
    "check_uidl",
    "is_inbox",
]

INBOX: Final = "INBOX"
TRASH: Final = "Trash"
ARCHIVE: Final = "Archive"
# The device of a login that names none: a single client is exactly RFC 1939's.
DEFAULT_DEVICE: Final = "default"
DAY: Final = 86_400

# Dovecot refuses mailbox names past 255 octets; a folder is also a directory name
# (".NAME" under the Maildir) and a login name part, so a shorter bound keeps both.
MAX_FOLDER_NAME: Final = 100
# A device name comes from a login name (at most 128 characters, auth.names) and, for
# a shared mailbox, is the member's user name with an optional device after a "/".
MAX_DEVICE_NAME: Final = 2 * 128 + 1
# A UIDL is 1 to 70 characters in the range 0x21 to 0x7E (RFC 1939 section 7).
MAX_UIDL_LENGTH: Final = 70

# ASCII letters, digits and "_ - ." only: a folder name becomes ".NAME" in the Maildir
# (Maildir++), so no "/", no leading or doubled ".", no control characters. A "."
# inside is Maildir++'s hierarchy separator (".lists.python").
_FOLDER: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
# The characters of a user name (auth.names), since a member's name is a device.
_DEVICE_PART: Final = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*")


def is_inbox(folder: str) -> bool:
    """INBOX names the Maildir's root in any case, as in IMAP (RFC 3501 section 5.1)."""
    return folder.upper() == INBOX


def check_folder_name(folder: str) -> str:
    """The folder name as stored (INBOX for any case of it); InvalidMailboxName if it
    could name anything but a Maildir++ folder of this mailbox."""
    if is_inbox(folder):
        return INBOX
    if len(folder) > MAX_FOLDER_NAME or _FOLDER.fullmatch(folder) is None:
        raise InvalidMailboxName(
            f"folder name {folder[:40]!r} may hold only ASCII letters, digits and _ - . "
            f"(not at either end or twice in a row), at most {MAX_FOLDER_NAME} characters"
        )
    return folder


def check_device_name(device: str) -> str:
    """``device`` unchanged if it can name a device; InvalidMailboxName if not.

    A device is a name or, for a member of a shared mailbox, ``member/name``.
    """
    parts = device.split("/")
    if (
        len(device) > MAX_DEVICE_NAME
        or len(parts) > 2
        or any(_DEVICE_PART.fullmatch(part) is None for part in parts)
    ):
        raise InvalidMailboxName(
            f"device name {device[:40]!r} may hold only ASCII letters, digits and . _ - @ +, "
            "and may not start with '.' or '-'"
        )
    return device


def check_uidl(uidl: str) -> str:
    """``uidl`` unchanged if RFC 1939 (section 7) allows it; InvalidUidl if not.

    For a UIDL handed to the store (one kept from the server popbox replaces): 1 to
    70 characters, each 0x21 to 0x7E, so no space, control or non-ASCII character.
    """
    if (
        not 1 <= len(uidl) <= MAX_UIDL_LENGTH
        or not uidl.isascii()
        or not uidl.isprintable()
        or " " in uidl
    ):
        raise InvalidUidl(
            f"UIDL {uidl[:40]!r} must be 1 to {MAX_UIDL_LENGTH} printable ASCII characters "
            "without spaces (RFC 1939 section 7)"
        )
    return uidl


class Disposition(enum.Enum):
    """What removing a message does (per server, per user)."""

    DELETE = "delete"
    """Gone for good, as in RFC 1939."""
    TRASH = "trash"
    """Moved to the Trash folder, which empties itself after ``trash_days``."""
    ARCHIVE = "archive"
    """Moved to the Archive folder and kept."""
    KEEP = "keep"
    """Hidden from every device at once, the file removed after ``keep_days``."""


@dataclass(frozen=True, slots=True)
class MailboxPolicy:
    """The rules for one user's mailbox: the server's settings with the user's own."""

    disposition: Disposition = Disposition.DELETE
    keep_days: int = 30
    """KEEP: how long a hidden message stays before its file goes."""
    trash_days: int = 30
    """How long a message stays in Trash (counted from the move)."""
    retention_days: int | None = None
    """EXPIRE (RFC 2449): days after a message's first retrieval when it is removed;
    None for NEVER, 0 for "removed when the session that retrieved it QUITs"."""
    active_days: int = 30
    """A device that has not logged in for this long stops holding mail back."""
    recent_days: int = 30
    """How far back a recent-mode login looks."""
    login_delay: int = 0
    """LOGIN-DELAY (RFC 2449): least seconds between two logins of one device; 0: none."""

    def disposition_in(self, folder: str) -> Disposition:
        """What removal does in ``folder``: in Trash and Archive it deletes for good."""
        if folder in (TRASH, ARCHIVE):
            return Disposition.DELETE
        return self.disposition


@dataclass(frozen=True, slots=True)
class MailboxView:
    """What a login opens: a folder, as seen by one device, in normal or recent mode."""

    folder: str = INBOX
    device: str = DEFAULT_DEVICE
    recent: bool = False
    """Recent mode: the last ``policy.recent_days`` of mail, whatever other devices
    deleted; such a login never holds mail back from removal."""
    policy: MailboxPolicy = field(default_factory=MailboxPolicy)
    inspect: bool = False
    """popbox's own look at the folder (a delivery's duplicate check, an audit), not a
    device's login: it notes no login, sees every message stored but the hidden
    ones, and may not commit deletions."""


DEFAULT_VIEW: Final = MailboxView()
# The view for popbox's own looks at a folder (MailboxView.inspect).
INSPECT_VIEW: Final = MailboxView(inspect=True)


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """One device of a folder, for ``popbox user show``."""

    folder: str
    device: str
    last_login: float
    """When it last logged in (any mode), seconds since the epoch."""
    last_hold: float
    """When it last logged in in normal mode (0 if never): it holds mail while this
    is within ``active_days``."""
    pending: int
    """Messages it would see at its next normal login."""
    deleted: int
    """Messages still stored that it has deleted (held by other devices)."""


@dataclass(slots=True)
class SweepReport:
    """What a sweep of one user's mailbox did."""

    removed: int = 0
    """Messages deleted for good."""
    moved: int = 0
    """Messages moved to Trash or Archive."""
    hidden: int = 0
    """Messages hidden from every device, kept until their ``keep_days`` are up."""
    busy: list[str] = field(default_factory=list)
    """Folders skipped because a session held them (swept next time)."""

    def add(self, other: SweepReport) -> None:
        self.removed += other.removed
        self.moved += other.moved
        self.hidden += other.hidden
        self.busy.extend(other.busy)


@dataclass(frozen=True, slots=True)
class AdoptReport:
    """What ``MaildirStore.adopt_uidls`` did with each message key it was given."""

    adopted: tuple[str, ...] = ()
    """Keys that now keep the UIDL given for them."""
    already: tuple[str, ...] = ()
    """Keys that kept that very UIDL already (a second run of the same mapping)."""
    missing: tuple[str, ...] = ()
    """Keys of no message in the folder."""
    invalid: tuple[str, ...] = ()
    """Keys whose UIDL cannot be given: not RFC 1939's, in popbox's own form for the
    folder, served for another message already, or not the one this message keeps."""
    ordered: bool = False
    """Whether ``order`` numbered the messages (only a folder's first index does)."""

    @property
    def counts(self) -> dict[str, int]:
        """How many keys went each way, for a report line."""
        return {
            "adopted": len(self.adopted),
            "already": len(self.already),
            "missing": len(self.missing),
            "invalid": len(self.invalid),
        }
