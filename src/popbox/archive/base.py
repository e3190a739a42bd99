"""The archive's plug-in point: every kept message of every user, searchable.

An archive keeps copies of messages apart from the mailboxes POP3 clients empty: a
copy of what was delivered, of what the collector fetched, of what a mailbox's
``archive`` disposition removed, and of what a user imported from the local archive a
desktop client left behind. It outlives every client; search, export, backup and the
web page read it.

Rules every implementation keeps (one contract suite, tests/archive, checks them):

- **Per user.** Every call names the user, and an entry id is only ever looked up
  together with its user: another user's id is ``NoSuchEntry``, exactly like an id
  that does not exist. No query reaches past its user.
- **Once per content.** A message is stored once however many users keep it, and a
  part two messages share (the same attachment) once; a user who keeps the same
  message twice gets one entry (``Added.new`` is False the second time).
- **Durable before it returns.** ``add``/``add_batch`` return once the message and its
  index entry survive a power cut; a crash before that leaves no half entry, and the
  index can always be rebuilt from the stored messages (``reindex``).
- **Byte-exact.** ``read`` gives back exactly the octets ``add`` was given.
- **Bounded.** Memory per call is bounded whatever the message size; what is indexed
  of a huge or hostile message is bounded too (popbox.archive.extract).
- **Legal hold wins.** A held entry is never removed, by retention or by ``delete``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeAlias

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "Added",
    "And",
    "Archive",
    "ArchiveSource",
    "ArchiveUsage",
    "DateBound",
    "Entry",
    "Has",
    "Hit",
    "MatchAll",
    "Not",
    "Or",
    "Query",
    "SearchPage",
    "SizeBound",
    "Snippet",
    "Term",
    "TermField",
]

# A page of search results: what a screen shows (notmuch and Gmail show 50).
DEFAULT_PAGE: Final = 50
# The most one call returns; export and the CLI page through with ``entries``.
MAX_PAGE: Final = 1000


class ArchiveSource(enum.Enum):
    """How a message came into the archive."""

    DELIVERED = "delivered"
    """A copy of a delivery (LMTP, ``popbox deliver``, the collector's popbox sink)."""
    COLLECTED = "collected"
    """Fetched by ``popbox fetch`` into an ``archive`` sink."""
    DISPOSITION = "disposition"
    """Removed from a mailbox under the ``archive`` disposition."""
    IMPORTED = "imported"
    """Brought in by ``popbox archive import`` (an mbox, a Maildir, .eml files)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One archived message of one user, as search results and listings show it.

    The header values are decoded (RFC 2047, any charset the stdlib email package
    reads) and bounded in length; ``date`` is the Date header's moment when it has
    one that parses, else None (sorting then uses ``received``).
    """

    id: int
    user: str
    digest: str
    """SHA-256 (hex) of the message's octets: what recognises the same message."""
    size: int
    """Octets as stored, the length of what ``read`` gives back."""
    received: float
    """When it came into the archive (or was delivered), seconds since the epoch."""
    date: float | None
    sender: str
    recipients: str
    """To and Cc, as one line."""
    subject: str
    message_id: str
    attachments: tuple[str, ...]
    """The file names of its attachments, in order ("" for an unnamed one)."""
    source: ArchiveSource
    folder: str
    hold: bool

    @property
    def sort_time(self) -> float:
        """What results are ordered by, newest first."""
        return self.date if self.date is not None else self.received


@dataclass(frozen=True, slots=True)
class Snippet:
    """A piece of a message's text around what matched, in order: ``(text, matched)``
    pairs, so a page can mark the matches after escaping the text itself."""

    parts: tuple[tuple[str, bool], ...] = ()

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.parts)


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry
    snippet: Snippet


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of results, newest first, and how many match in all."""

    hits: tuple[Hit, ...]
    total: int


@dataclass(frozen=True, slots=True)
class Added:
    """What ``add`` did: the user's entry, and whether it is new (False: the user
    already kept this very message, and nothing was stored again)."""

    entry: Entry
    new: bool


@dataclass(frozen=True, slots=True)
class ArchiveUsage:
    """One user's share: entries, the octets they stand for, and how many are held."""

    user: str
    messages: int
    octets: int
    held: int


# --- The query language (popbox.archive.query reads it from text) -----------------
#
# Gmail's and notmuch's words: terms and "quoted phrases" anywhere in the message,
# from: to: subject: filename:, has:attachment, before:/after: a date, larger:/
# smaller: a size, AND (implicit), OR, NOT or a leading "-", and parentheses.


class TermField(enum.Enum):
    ANY = "any"
    """Headers, text, HTML as text and attachment names."""
    FROM = "from"
    TO = "to"
    """To and Cc."""
    SUBJECT = "subject"
    BODY = "body"
    FILENAME = "filename"
    """Attachment names."""


@dataclass(frozen=True, slots=True)
class Term:
    """Words that must appear in ``field``; a phrase must appear in that order.
    A word ending in ``*`` matches every word it begins."""

    field: TermField
    text: str
    phrase: bool = False


@dataclass(frozen=True, slots=True)
class Has:
    """``has:attachment``: the message has at least one attachment."""

    what: str = "attachment"


@dataclass(frozen=True, slots=True)
class DateBound:
    """``before:2026-01-31`` (``before=True``) or ``after:2026-01-01``: the message's
    sort time is before / on or after ``moment`` (seconds since the epoch)."""

    before: bool
    moment: float


@dataclass(frozen=True, slots=True)
class SizeBound:
    """``larger:5M`` (``larger=True``) or ``smaller:100k``, in octets."""

    larger: bool
    octets: int


@dataclass(frozen=True, slots=True)
class MatchAll:
    """The empty query: every message of the user."""


@dataclass(frozen=True, slots=True)
class And:
    parts: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class Or:
    parts: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class Not:
    part: Query


Query: TypeAlias = Term | Has | DateBound | SizeBound | MatchAll | And | Or | Not


class Archive(Protocol):
    """Where kept messages live, with their full-text index (see the module's rules)."""

    async def add(
        self,
        user: str,
        message: bytes | Path,
        *,
        source: ArchiveSource,
        folder: str = "INBOX",
        received: float | None = None,
        origin: str | None = None,
    ) -> Added:
        """Keep ``message`` (its octets, or a file holding them) for ``user``, durably.

        ``origin`` names where it was taken from (``"Archive/<uidl>"`` for the
        ``archive`` disposition's folder), so a later look can skip what is kept
        already without reading it again (``known_origins``).
        """
        ...

    async def known_origins(self, user: str, origins: Collection[str]) -> set[str]:
        """Which of ``origins`` the user's archive has taken a message from."""
        ...

    async def add_batch(
        self,
        user: str,
        messages: Sequence[bytes | Path],
        *,
        source: ArchiveSource,
        folder: str = "INBOX",
    ) -> list[Added]:
        """``add`` for many messages at once, made durable together (an import)."""
        ...

    async def search(
        self, user: str, query: Query, *, limit: int = DEFAULT_PAGE, offset: int = 0
    ) -> SearchPage:
        """The user's entries that match, newest first, with snippets."""
        ...

    def entries(self, user: str, query: Query, *, after_id: int = 0) -> AsyncIterator[Entry]:
        """Every matching entry with an id above ``after_id``, in id order: what an
        export walks, and resumes from the last id it wrote."""
        ...

    async def entry(self, user: str, entry_id: int) -> Entry:
        """One entry; NoSuchEntry if the user has none with that id."""
        ...

    def read(self, user: str, entry_id: int) -> AsyncIterator[bytes]:
        """The message's octets exactly as added, in chunks; NoSuchEntry as ``entry``."""
        ...

    async def set_hold(self, user: str, entry_ids: Sequence[int] | None, hold: bool) -> int:
        """Put entries under legal hold or release them (None: all of the user's);
        returns how many changed."""
        ...

    async def delete(self, user: str, entry_ids: Sequence[int]) -> int:
        """Remove entries (EntryOnHold if any is held, and then none is removed);
        content no entry uses any more is freed. Returns how many went."""
        ...

    async def expire(self, user: str, keep_days: int, now: float) -> int:
        """Remove the user's entries received more than ``keep_days`` before ``now``
        that are not held; returns how many went."""
        ...

    async def users(self) -> list[ArchiveUsage]:
        """Every user with entries, by name."""
        ...

    async def reindex(self, user: str | None = None) -> int:
        """Rebuild the search index from the stored messages (one user, or all);
        returns how many entries were indexed."""
        ...

    async def close(self) -> None: ...
