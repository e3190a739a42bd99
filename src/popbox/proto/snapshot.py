"""The session's view of its maildrop: message numbering, deletion marks and listings.

``Snapshot`` is what the server connection holds from login to QUIT: the one place
where a message number becomes a snapshot index (and back), the DELE marks that only
QUIT commits, and the LIST and UIDL listings, rendered from the store's columns and
kept with them so that the sessions of one snapshot version render each once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Literal, Protocol, TypeGuard, runtime_checkable

from popbox.proto.commands import MessageNumber
from popbox.proto.events import SnapshotIndex
from popbox.proto.replies import err

__all__ = [
    "ListingKind",
    "MessageColumns",
    "MessageLike",
    "Snapshot",
    "TemplatedColumn",
    "render_listing",
]


class MessageLike(Protocol):
    """What the core needs of a snapshot entry (popbox.store.base.MessageInfo fits)."""

    @property
    def uidl(self) -> str: ...

    @property
    def size(self) -> int: ...


@runtime_checkable
class MessageColumns(Protocol):
    """A snapshot that also offers its fields as columns (store.base.MessageTable).

    The core then reads ``uidls`` and ``sizes`` as they are instead of asking every
    message, trusts ``uidls_checked`` (the provider guarantees RFC 1939 UIDLs), and
    keeps the full listings it renders in ``rendered``, which lives as long as the
    provider's snapshot does, so the sessions that share it render each one once.
    """

    @property
    def uidls(self) -> Sequence[str]: ...

    @property
    def sizes(self) -> Sequence[int]: ...

    @property
    def uidls_checked(self) -> bool: ...

    @property
    def rendered(self) -> dict[str, bytes]: ...


@runtime_checkable
class TemplatedColumn(Protocol):
    """A column of strings that says how they are made: item i is ``template %
    arguments[i]``, ``template`` holding exactly one %-conversion and no other ``%``.

    A store whose UIDLs are a fixed prefix and a number (store.index.UidlColumn)
    offers this on its ``uidls``: the core then renders a listing with one %-format
    straight from the arguments, and a session that only lists never makes the
    strings.
    """

    @property
    def template(self) -> str: ...

    @property
    def arguments(self) -> Sequence[object]: ...


ListingKind = Literal["LIST", "UIDL"]


# Whether a type offers MessageColumns, by type: isinstance() against a runtime
# Protocol inspects every member each time, which is slow, and every
# connection makes two snapshots (the empty one, then the maildrop's).
_COLUMN_TYPES: dict[type, bool] = {tuple: False, list: False}


def _offers_columns(messages: object) -> TypeGuard[MessageColumns]:
    kind = type(messages)
    offers = _COLUMN_TYPES.get(kind)
    if offers is None:
        offers = _COLUMN_TYPES[kind] = isinstance(messages, MessageColumns)
    return offers


class Snapshot:
    """The session's view of the maildrop: numbering and deletion marks.

    This is the one place where a message number becomes a snapshot index and back.
    """

    __slots__ = (
        "_deleted",
        "_deleted_octets",
        "_rendered",
        "_sizes",
        "_total",
        "_uidls",
        "_uidls_clean",
    )

    def __init__(self, messages: Sequence[MessageLike]) -> None:
        # Whether every UIDL is already a safe wire token (checked once, on first use).
        self._uidls_clean: bool | None = None
        self._uidls: Sequence[str]
        self._sizes: Sequence[int]
        if _offers_columns(messages):
            # Shared, never changed: a 100,000-message login copies nothing.
            self._uidls = messages.uidls
            self._sizes = messages.sizes
            self._rendered = messages.rendered
            if messages.uidls_checked:
                self._uidls_clean = True
        else:
            self._uidls = [message.uidl for message in messages]
            self._sizes = [message.size for message in messages]
            self._rendered = {}
        # Kept up to date so that STAT, asked again and again by pipelining and
        # polling clients, does not sum 100,000 sizes each time.
        self._total = sum(self._sizes)
        self._deleted_octets = 0
        self._deleted: set[SnapshotIndex] = set()

    @staticmethod
    def number_of(index: SnapshotIndex) -> MessageNumber:
        return MessageNumber(index + 1)

    def index_of(self, number: MessageNumber) -> SnapshotIndex | bytes:
        """The index of a live message, or the -ERR reply saying why there is none."""
        if not 1 <= number <= len(self._sizes):
            return err("No such message.")
        index = SnapshotIndex(number - 1)
        if index in self._deleted:
            return err(f"Message {number} already deleted.")
        return index

    def live(self) -> Iterator[tuple[MessageNumber, SnapshotIndex]]:
        for position in range(len(self._sizes)):
            index = SnapshotIndex(position)
            if index not in self._deleted:
                yield self.number_of(index), index

    def size(self, index: SnapshotIndex) -> int:
        return self._sizes[index]

    def uidl(self, index: SnapshotIndex) -> str:
        return self._uidls[index]

    @property
    def sizes(self) -> Sequence[int]:
        return self._sizes

    @property
    def uidls(self) -> Sequence[str]:
        return self._uidls

    def uidls_clean(self) -> bool:
        """Every UIDL is 1-70 printable ASCII octets without spaces (RFC 1939 s7).

        The store guarantees it; checking it once here, in a few C-level passes,
        lets the listings skip the per-line cleaning that guards free text.
        """
        if self._uidls_clean is None:
            uidls = self._uidls
            joined = "".join(uidls)
            self._uidls_clean = (
                joined.isascii()
                and joined.isprintable()
                and " " not in joined
                and (not uidls or (min(map(len, uidls)) >= 1 and max(map(len, uidls)) <= 70))
            )
        return self._uidls_clean

    def listing(self, kind: ListingKind) -> bytes:
        """``n value\\r\\n`` for every live message, as one block.

        The values are the sizes (LIST) or the clean UIDLs (UIDL); neither can start
        a line with a dot (lines start with the number), so no stuffing is needed.
        The full listing (nothing deleted) is kept with the snapshot's columns.
        """
        if not self._deleted:
            block = self._rendered.get(kind)
            if block is None:
                block = self._rendered[kind] = self._render(kind, None)
            return block
        live = [i for i in range(len(self._sizes)) if i not in self._deleted]
        return self._render(kind, live)

    def _render(self, kind: ListingKind, live: list[int] | None) -> bytes:
        """The lines for the messages at ``live`` (None: all of them)."""
        values: Sequence[object] = self._sizes if kind == "LIST" else self._uidls
        template = "%s"
        if isinstance(values, TemplatedColumn):  # once per rendering, not per login
            template, values = values.template, values.arguments
        if live is None:
            return _render_listing(range(1, len(values) + 1), values, template)
        return _render_listing([i + 1 for i in live], [values[i] for i in live], template)

    def stat(self) -> tuple[int, int]:
        """Count and octets of the messages not marked deleted."""
        return len(self._sizes) - len(self._deleted), self._total - self._deleted_octets

    def delete(self, index: SnapshotIndex) -> None:
        if index not in self._deleted:
            self._deleted.add(index)
            self._deleted_octets += self._sizes[index]

    def undelete_all(self) -> None:
        self._deleted.clear()
        self._deleted_octets = 0

    def deletions(self) -> frozenset[int]:
        return frozenset(self._deleted)


# One line of a LIST or UIDL listing, around the value's %-conversion.
_LISTING_LINE: Final = "%%d %s\r\n"


def render_listing(values: Sequence[object]) -> bytes:
    """The lines of a full LIST or UIDL listing (``n value\\r\\n``, n from 1), without
    its status line and terminator: what ``Snapshot.listing`` keeps with the columns."""
    return _render_listing(range(1, len(values) + 1), values)


def _render_listing(
    numbers: Iterable[int], values: Sequence[object], template: str = "%s"
) -> bytes:
    """The lines of a listing, made by ONE %-format of the repeated line (C-level,
    where a format call per line costs a Python step per message); each value goes
    through ``template`` (a TemplatedColumn's) on the way."""
    line = _LISTING_LINE % template
    pairs = tuple(itertools.chain.from_iterable(zip(numbers, values, strict=True)))
    return ((line * len(values)) % pairs).encode("ascii")
