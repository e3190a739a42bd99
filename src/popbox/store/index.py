"""The Maildir side of the store: file names, file sizes and the per-maildrop index.

Everything here is synchronous and raises plain ``OSError``; ``store.maildir`` runs it
in worker threads and translates errors. The index in memory (``MaildirIndex``) is
kept as columns, every message in UID order, as ``store.index_file`` reads and
writes them: no per-message object is made until something changes, paths are split
when a message is first read and UIDL strings made when one is first asked for
(docs/performance.md).

A message's key (what survives flag renames and new/ -> cur/ moves) is the file name
up to the first ``:``. ``next_uid`` is the next UID to hand out; it only grows, so a
UIDL is never reused even after its message is deleted. ``cur_mtime`` is the mtime
of cur/ when the index was written (0 when it was too recent to trust); with the
count of messages still in new/ it lets a login skip listing cur/ and a quota check
skip reading past the header.

A message's UIDL is ``f"{uidvalidity:08x}{uid:08x}"`` (16 hex digits). A rebuilt
index takes a larger UIDVALIDITY (also noted in ``popbox.lock``), so no UIDL repeats.
Messages that keep a UIDL from the server popbox replaced (store.maildir_uidls) have
it in ``uidl_overrides`` by UID instead; a folder without any keeps the plain column.
"""

from __future__ import annotations

import operator
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, overload

from popbox.fileio import fsync_dir, write_all
from popbox.wireform import WireSizeCounter, wire_size

if TYPE_CHECKING:
    # Only named: store.maildir_uidls reads the file and builds on this module.
    from popbox.store.maildir_uidls import UidlJournal

__all__ = [
    "CorruptIndex",
    "DeferredColumn",
    "IndexColumns",
    "IndexEntry",
    "IndexHeader",
    "KeptUidlColumn",
    "MaildirIndex",
    "UidlColumn",
    "arrival_order",
    "fsync_dir",
    "is_message_name",
    "message_key",
    "messages_by_key",
    "regular_names",
    "scan_messages",
    "size_fields",
    "sorted_by_arrival",
    "wire_field",
    "wire_size_of_file",
    "write_all",
]

# UIDs in memory: unsigned 64-bit words, as the index file stores them.
_UID_ARRAY: Final = "Q"
# Whether a DIR/NAME path is in new/, as a C-level callable for map().
_IN_NEW: Final = operator.methodcaller("startswith", "new/")
# Directory entries that are regular files (not symlinks), and their names, as
# C-level callables for filter() and map().
_IS_REGULAR: Final = operator.methodcaller("is_file", follow_symlinks=False)
_ENTRY_NAME: Final = operator.attrgetter("name")
# A message's key in a DIR/NAME path of the index, one match per line.
_PATH_KEY: Final = re.compile(r"^(?:cur|new)/([^:\n]*)", re.M)
# Bodies are read in pieces of this size when a size has to be computed, so a 200 MB
# message never sits in memory (the same bound the sessions use when streaming).
READ_CHUNK: Final = 64 * 1024


class CorruptIndex(ValueError):
    """The index file exists but cannot be trusted; it will be rebuilt.

    ``uidvalidity`` is the old value when the header was still readable, so that the
    rebuilt index can pick a larger one and never hand out an old UIDL again.
    """

    def __init__(self, reason: str, uidvalidity: int | None = None) -> None:
        super().__init__(reason)
        self.uidvalidity = uidvalidity


def wire_size_of_file(path: Path | str, dir_fd: int | None = None) -> int:
    """Read ``path`` once, in bounded chunks, and return its wire size.

    ``dir_fd`` opens ``path`` relative to an open directory: a cold login sizing
    100,000 files then builds no Path per file (half its time went to file objects
    and per-chunk Python work, docs/performance.md).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        data = os.read(fd, READ_CHUNK)
        if len(data) < READ_CHUNK:
            rest = os.read(fd, READ_CHUNK)  # a short read is EOF for a file on Linux,
            if not rest:  # but one more read proves it for the price of a syscall
                return wire_size(data)
            data += rest
        counter = WireSizeCounter()
        while data:
            counter.feed(data)
            data = os.read(fd, READ_CHUNK)
        return counter.wire
    finally:
        os.close(fd)


def is_message_name(name: str) -> bool:
    """Whether a directory entry in new/ or cur/ names a message.

    Dotfiles are other software's bookkeeping (the Maildir convention); names with
    line breaks cannot be written to the line-based index and are left alone.
    """
    return bool(name) and not name.startswith(".") and "\n" not in name and "\r" not in name


def message_key(name: str) -> str:
    """The part of a Maildir file name that survives flag changes: up to the first ':'."""
    return name.partition(":")[0]


def size_fields(name: str) -> tuple[int | None, int | None]:
    """``(S=, W=)`` from a Maildir name (Dovecot/Courier style), each None when absent.

    S= is the stored size and W= the size with CRLF line ends (without a final CRLF
    added to a message that lacks one, as Dovecot counts it); fields follow the
    unique part, separated by commas, before the ``:2,`` info.
    """
    stored: int | None = None
    wire: int | None = None
    if "," not in name:  # Postfix, getmail and most MTAs: no fields at all
        return stored, wire
    for part in message_key(name).split(",")[1:]:
        tag, _, value = part.partition("=")
        if not value.isdigit() or not value.isascii():
            continue
        if tag == "S":
            stored = int(value)
        elif tag == "W":
            wire = int(value)
    return stored, wire


def wire_field(name: str) -> int | None:
    """``size_fields(name)[1]`` for the hot loop of a cold login, in one search.

    The last valid W= wins in size_fields; the last W= is found first here and,
    being valid in every name popbox or Dovecot writes, settles it at once.
    """
    key = name.partition(":")[0]
    at = key.rfind(",W=")
    if at < 0:
        return None
    value = key[at + 3 :].partition(",")[0]
    if value.isdigit() and value.isascii():
        return int(value)
    return size_fields(name)[1]  # a malformed last W=: an earlier one may count


def sorted_by_arrival(paths: dict[str, str]) -> list[tuple[str, str]]:
    """``(key, DIR/NAME)`` pairs ordered by ``arrival_order`` of NAME, oldest first.

    When every name starts with the same number of digits (all of one Maildir
    writer's names for centuries), comparing the names as strings gives that same
    order, and sorting 100,000 of them needs no Python call per comparison key.
    """
    by_name = {path[4:]: (key, path) for key, path in paths.items()}
    widths = {len(name) - len(name.lstrip("0123456789")) for name in by_name}
    if len(widths) == 1 and 0 not in widths:
        # Names are unique (one per key): sorting the bare strings takes CPython's
        # string-only fast path, half the time of sorting (name, item) tuples.
        return [by_name[name] for name in sorted(by_name)]
    return sorted(paths.items(), key=lambda item: arrival_order(item[1][4:]))


def arrival_order(name: str) -> tuple[int, str]:
    """Sort key for messages the index has not seen: delivery time, then name.

    Every common Maildir writer starts the name with the delivery time in seconds, so
    this orders new mail oldest first without a stat() per file.
    """
    digits = len(name) - len(name.lstrip("0123456789"))
    seconds = int(name[:digits]) if digits and name[:digits].isascii() else 1 << 62
    return seconds, name


def regular_names(directory: Path | str) -> list[str]:
    """Every regular file's name in ``directory``, symlinks excluded, in listing order.

    DirEntry.is_file uses d_type, so no stat per entry, and filter/map keep the loop
    in C: a cold login lists 100,000 names here. No Maildir writer makes links, and
    one planted in a Maildir must not make a session read a file elsewhere.
    """
    with os.scandir(directory) as entries:
        return list(map(_ENTRY_NAME, filter(_IS_REGULAR, entries)))


def messages_by_key(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Message names (``is_message_name``) by key, and the names whose key was seen twice.

    A key that appears twice (foreign software gone wrong) keeps its first name.
    """
    by_key: dict[str, str] = {}
    duplicates: list[str] = []
    for name in names:
        # is_message_name() and message_key() inline: this loop runs once per
        # file of a 100,000-message login. Directory listings never hold "".
        if name[0] == "." or "\n" in name or "\r" in name:
            continue
        key = name.partition(":")[0]
        if key in by_key:
            duplicates.append(name)
        else:
            by_key[key] = name
    return by_key, duplicates


def scan_messages(directory: Path) -> tuple[dict[str, str], list[str]]:
    """``messages_by_key`` of the regular files in ``directory``."""
    return messages_by_key(regular_names(directory))


@dataclass(slots=True)
class IndexEntry:
    """One indexed message: its UID, wire size and where it was last seen."""

    uid: int
    size: int
    path: str
    """``cur/NAME`` or ``new/NAME``, relative to the Maildir."""


@dataclass(frozen=True, slots=True)
class IndexHeader:
    """The first line of the index: enough for usage() without reading the rest."""

    uidvalidity: int
    next_uid: int
    count: int
    octets: int
    cur_mtime: int
    in_new: int


@dataclass(frozen=True, slots=True)
class IndexColumns:
    """Every message of an index in UID order, one sequence per field.

    This is what the file holds and what a snapshot needs; position i of each
    sequence is the same message.
    """

    uids: Sequence[int]
    sizes: Sequence[int]
    paths: Sequence[str]
    uidls: Sequence[str]


class MaildirIndex:
    """The whole index in memory: entries by key, in UID order.

    An index read from a file in a column format starts as its columns; ``entries``
    (a dict of IndexEntry by key, which every change goes through) is built on first
    use, so a login that finds nothing new never makes 100,000 objects.
    """

    __slots__ = (
        "_columns",
        "_entries",
        "cur_mtime",
        "next_uid",
        "outdated_format",
        "uidl_journal",
        "uidl_overrides",
        "uidvalidity",
        "written_in_new",
    )

    def __init__(
        self,
        uidvalidity: int,
        next_uid: int = 1,
        cur_mtime: int = 0,
        entries: dict[str, IndexEntry] | None = None,
        written_in_new: int = 0,
        *,
        columns: IndexColumns | None = None,
    ) -> None:
        self.uidvalidity = uidvalidity
        self.next_uid = next_uid
        self.cur_mtime = cur_mtime
        self.written_in_new = written_in_new
        """How many entries were in new/ when the file was last read or written."""
        self.outdated_format = False
        """Read from an older file format: write it again even if nothing changed."""
        self.uidl_overrides: Mapping[int, str] = {}
        """UIDLs kept from the server popbox replaced, by UID (store.maildir_uidls)."""
        self.uidl_journal: UidlJournal | None = None
        """The parsed ``popbox.uidls`` the overrides came from (store.maildir_uidls
        keeps it here so an unchanged file is not read again), None if none."""
        # Exactly one of the two holds the messages; columns turn into entries once.
        self._columns: IndexColumns | None = None
        self._entries: dict[str, IndexEntry] | None = entries if entries is not None else {}
        if columns is not None and entries is None:
            self._columns, self._entries = columns, None

    def take_columns(self, columns: IndexColumns) -> None:
        """Hold these columns (as read from the file) instead of any entries."""
        self._columns, self._entries = columns, None

    @property
    def entries(self) -> dict[str, IndexEntry]:
        """The messages by key, in UID order (built from the columns on first use)."""
        if self._entries is None:
            columns = self._columns
            assert columns is not None
            self._entries = {
                path[4:].partition(":")[0]: IndexEntry(uid, size, path)
                for uid, size, path in zip(columns.uids, columns.sizes, columns.paths, strict=True)
            }
            self._columns = None
        return self._entries

    def columns(self) -> IndexColumns:
        """The messages as columns; free for an index that has not changed since read."""
        if self._columns is not None:
            return self._columns
        entries = self.entries.values()
        uids = [entry.uid for entry in entries]
        return IndexColumns(
            uids,
            [entry.size for entry in entries],
            [entry.path for entry in entries],
            self.uidl_column(uids),
        )

    def __len__(self) -> int:
        return len(self._columns.uids) if self._columns is not None else len(self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaildirIndex):
            return NotImplemented
        mine, theirs = self.columns(), other.columns()
        return (self.uidvalidity, self.next_uid, self.cur_mtime) == (
            other.uidvalidity,
            other.next_uid,
            other.cur_mtime,
        ) and all(
            list(a) == list(b)
            for a, b in (
                (mine.uids, theirs.uids),
                (mine.sizes, theirs.sizes),
                (mine.paths, theirs.paths),
            )
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def assign_all(self, paths: Sequence[str], sizes: Sequence[int]) -> None:
        """``assign`` each DIR/NAME with its size, in this order.

        An index that holds nothing yet (a first or rebuilt index: 100,000 messages
        at a cold login) takes them as columns, without an IndexEntry each.
        """
        if self._columns is None and not self.entries:
            uids = array(_UID_ARRAY, range(self.next_uid, self.next_uid + len(paths)))
            # The UIDL strings only when a session asks for them (like an index just read).
            self._columns = IndexColumns(
                uids,
                list(sizes),
                list(paths),
                self.uidl_column(uids),
            )
            self._entries = None
            self.next_uid += len(paths)
            return
        for path, size in zip(paths, sizes, strict=True):
            self.assign(path[4:].partition(":")[0], size, path)

    def assign(self, key: str, size: int, path: str) -> IndexEntry:
        """Give a message the next UID; UIDs only grow, so none is ever reused."""
        entry = IndexEntry(self.next_uid, size, path)
        self.next_uid += 1
        self.entries[key] = entry
        return entry

    @property
    def uidl_template(self) -> str:
        """The UIDL of UID u is ``uidl_template % u``: the UIDVALIDITY and the UID in
        8+ hex digits each, printable ASCII, stable while the index is."""
        return f"{self.uidvalidity:08x}%08x"

    def uidl(self, uid: int) -> str:
        """The UIDL of a UID (``uidl_template``)."""
        return self.uidl_template % uid

    def uidl_column(self, uids: Sequence[int]) -> UidlColumn | KeptUidlColumn:
        """The UIDLs of ``uids`` as a column whose strings are made on first use: the
        plain templated column unless some UID keeps an imported UIDL."""
        overrides = self.uidl_overrides
        if overrides and not overrides.keys().isdisjoint(uids):
            return KeptUidlColumn(self.uidl_template, uids, overrides)
        return UidlColumn(self.uidl_template, uids)

    def set_uidl_overrides(self, overrides: Mapping[int, str], journal: UidlJournal | None) -> None:
        """Serve ``overrides`` (UIDLs by UID) instead of popbox's own for those UIDs,
        as found in ``journal``; the columns held take them at once."""
        self.uidl_journal = journal
        if overrides == self.uidl_overrides:
            return
        self.uidl_overrides = overrides
        if self._columns is not None:
            columns = self._columns
            self._columns = replace(columns, uidls=self.uidl_column(columns.uids))

    def uids_by_key(self, keys: Iterable[str]) -> dict[str, int]:
        """The UID of each of ``keys`` that the index holds.

        From the entries if they are built, else one pass over the paths column:
        only a folder with kept UIDLs pays it, once per index version.
        """
        wanted = set(keys)
        if self._entries is not None:
            entries = self._entries
            return {key: entries[key].uid for key in wanted if key in entries}
        columns = self._columns
        assert columns is not None
        paths = columns.paths
        if isinstance(paths, DeferredColumn) and paths.source is not None:
            # As stored: every key in one C-level pass, without splitting the paths.
            keys = _PATH_KEY.findall(paths.source.decode("utf-8", "surrogateescape"))
        else:
            keys = [path[4:].partition(":")[0] for path in paths]
        by_key = dict(zip(keys, columns.uids, strict=True))
        return {key: by_key[key] for key in wanted if key in by_key}

    def uidls(self) -> list[str]:
        """``uidl()`` of every entry in order."""
        return list(self.columns().uidls)

    def header(self, columns: IndexColumns | None = None) -> IndexHeader:
        """The totals of the index; ``columns`` is ``self.columns()`` if known."""
        if columns is None:
            columns = self.columns()
        return IndexHeader(
            uidvalidity=self.uidvalidity,
            next_uid=self.next_uid,
            count=len(columns.uids),
            octets=sum(columns.sizes),
            cur_mtime=self.cur_mtime,
            in_new=sum(map(_IN_NEW, columns.paths)),
        )


class DeferredColumn(Sequence[str]):
    """A list of strings made on first use, whose length is known before.

    The paths column is only needed to read or delete a message and the UIDL strings
    only for ``UIDL n`` (listings are rendered from the UIDs, ``UidlColumn``), so a
    login that only lists (a poll that finds nothing new) makes neither. ``source`` is
    the stored form, if any, to write back unchanged.
    """

    __slots__ = ("_items", "_length", "_make", "source")

    def __init__(
        self, length: int, make: Callable[[], list[str]], source: bytes | None = None
    ) -> None:
        self._length = length
        self._make: Callable[[], list[str]] | None = make
        self._items: list[str] = []
        self.source = source

    def _list(self) -> list[str]:
        if self._make is not None:
            self._items, self._make = self._make(), None
            if len(self._items) != self._length:  # the caller checked the stored form
                raise ValueError("deferred column of the wrong length")
        return self._items

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._list()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._list())


class UidlColumn(DeferredColumn):
    """The UIDLs of a snapshot, made on first use, that also say how they are made.

    Item i is ``template % arguments[i]`` (the UIDVALIDITY prefix, then the UID in
    hex), which the protocol core reads (proto.snapshot.TemplatedColumn) to render a
    listing with one %-format straight from the UIDs: a poll that only lists never
    makes the UIDL strings.
    """

    __slots__ = ("arguments", "template")

    def __init__(self, template: str, uids: Sequence[int]) -> None:
        # One C-level format per UID, the prefix made once.
        super().__init__(len(uids), lambda: list(map(template.__mod__, uids)))
        self.template = template
        self.arguments = uids


class KeptUidlColumn(DeferredColumn):
    """The UIDLs of a snapshot some of whose messages keep an imported UIDL.

    Item i is ``overrides[uids[i]]`` where there is one, else ``template % uids[i]``
    (UidlColumn's). It offers no template on purpose: the protocol core then renders
    its listings from the strings (proto.snapshot), which only folders with kept
    UIDLs pay for.
    """

    __slots__ = ()

    def __init__(self, template: str, uids: Sequence[int], overrides: Mapping[int, str]) -> None:
        def make() -> list[str]:
            get = overrides.get
            return [get(uid) or template % uid for uid in uids]

        super().__init__(len(uids), make)
