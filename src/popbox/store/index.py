"""The Maildir side of the store: file names, wire sizes and the per-maildrop index.

Everything here is synchronous and raises plain ``OSError``; ``store.maildir`` runs it
in worker threads and translates errors. The index file (``popbox-index`` in the
Maildir's root, a sibling of cur/, new/ and tmp/) is UTF-8 text, one header line and
one line per message in UIDL order::

    popbox-maildir-index 1 uidvalidity=65f0a1b2 next=4 count=2 octets=9146 cur_mtime=0 in_new=0
    1 3021 cur/1700000000.M1P2Q1R5a.host,S=2999,W=3021:2,S
    3 6125 cur/1700000100.M7P9Q2Rbb.host:2,

A line is ``UID WIRE_SIZE DIR/FILENAME``; the message's key (what survives flag
renames and new/ -> cur/ moves) is the file name up to the first ``:``. ``next`` is
the next UID to hand out; it only grows, so a UIDL is never reused even after its
message is deleted. ``count`` and ``octets`` are the totals of the listed messages and
``cur_mtime`` the mtime of cur/ when the index was written (0 when it was too recent
to trust) and ``in_new`` how many listed messages were still in new/; together they
let a login skip listing cur/ and a quota check skip reading past the header.

A message's UIDL is ``f"{uidvalidity:08x}{uid:08x}"`` (16 hex digits). A rebuilt
index takes a larger UIDVALIDITY (also noted in ``popbox.lock``), so no UIDL repeats.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "INDEX_NAME",
    "CorruptIndex",
    "IndexEntry",
    "IndexHeader",
    "IndexSignature",
    "MaildirIndex",
    "WireSizeCounter",
    "arrival_order",
    "fsync_dir",
    "index_signature",
    "is_message_name",
    "message_key",
    "read_header",
    "read_index",
    "scan_messages",
    "size_fields",
    "sorted_by_arrival",
    "wire_field",
    "wire_size_of_file",
    "write_index",
]

INDEX_NAME: Final = "popbox-index"
# Written beside the index and renamed over it, so a crash leaves the old or the new.
INDEX_TMP_NAME: Final = "popbox-index.tmp"
# The first token of the header; a file that does not start with it is not ours.
INDEX_MAGIC: Final = "popbox-maildir-index"
# Bumped when the line format changes; an unknown version is rebuilt, not guessed at.
INDEX_VERSION: Final = "1"
# A header line is short; reading at most this much keeps a garbage file from costing
# memory when only the header is wanted (quota checks).
MAX_HEADER_LINE: Final = 4096
# Bodies are read in pieces of this size when a size has to be computed, so a 200 MB
# message never sits in memory (the same bound the sessions use when streaming).
READ_CHUNK: Final = 64 * 1024
# The text encoding of the index: Maildir names are bytes to the kernel, and
# surrogateescape carries any non-UTF-8 name through unchanged.
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"


class CorruptIndex(ValueError):
    """The index file exists but cannot be trusted; it will be rebuilt.

    ``uidvalidity`` is the old value when the header was still readable, so that the
    rebuilt index can pick a larger one and never hand out an old UIDL again.
    """

    def __init__(self, reason: str, uidvalidity: int | None = None) -> None:
        super().__init__(reason)
        self.uidvalidity = uidvalidity


class WireSizeCounter:
    """Counts wire octets (popbox.proto.wire.wire_size) of data fed in pieces.

    Carries the last byte across pieces so that a CR LF split between two chunks
    counts as one line ending, exactly as if the whole message were counted at once.
    """

    __slots__ = ("_crlf", "_last", "_lf", "_octets")

    def __init__(self) -> None:
        self._octets = 0
        self._lf = 0
        self._crlf = 0
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._octets += len(chunk)
        self._lf += chunk.count(b"\n")
        self._crlf += chunk.count(b"\r\n")
        if self._last == b"\r" and chunk[:1] == b"\n":
            self._crlf += 1
        self._last = chunk[-1:]

    @property
    def stored(self) -> int:
        """Octets fed so far, as they are stored."""
        return self._octets

    @property
    def virtual(self) -> int:
        """Dovecot's "virtual size", what its W= field holds: every LF counted as CRLF,
        but no final CRLF added to a message that lacks one."""
        return self._octets + self._lf - self._crlf

    @property
    def terminated(self) -> bool:
        """Whether the data is empty or ends with a line end (then virtual == wire)."""
        return not self._octets or self._last == b"\n"

    @property
    def wire(self) -> int:
        """The wire size of everything fed so far (RETR adds the missing final CRLF)."""
        if not self._octets:
            return 0
        return self.virtual + (0 if self.terminated else 2)


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
                return _wire_size_of_bytes(data)
            data += rest
        counter = WireSizeCounter()
        while data:
            counter.feed(data)
            data = os.read(fd, READ_CHUNK)
        return counter.wire
    finally:
        os.close(fd)


def _wire_size_of_bytes(data: bytes) -> int:
    """WireSizeCounter's answer for one whole message, in three C-speed passes."""
    if not data:
        return 0
    wire = len(data) + data.count(b"\n") - data.count(b"\r\n")
    return wire if data[-1:] == b"\n" else wire + 2


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
    names = [path[4:] for path in paths.values()]
    widths = {len(name) - len(name.lstrip("0123456789")) for name in names}
    if len(widths) == 1 and 0 not in widths:
        # Names are unique (one per key), so the tuples never compare past them.
        return [item for _, item in sorted(zip(names, paths.items(), strict=True))]
    return sorted(paths.items(), key=lambda item: arrival_order(item[1][4:]))


def arrival_order(name: str) -> tuple[int, str]:
    """Sort key for messages the index has not seen: delivery time, then name.

    Every common Maildir writer starts the name with the delivery time in seconds, so
    this orders new mail oldest first without a stat() per file.
    """
    digits = len(name) - len(name.lstrip("0123456789"))
    seconds = int(name[:digits]) if digits and name[:digits].isascii() else 1 << 62
    return seconds, name


def scan_messages(directory: Path) -> tuple[dict[str, str], list[str]]:
    """Message names in ``directory`` by key, and the names whose key was seen twice.

    Only regular files count (DirEntry.is_file uses d_type, so no stat per entry).
    A key that appears twice (foreign software gone wrong) keeps its first name.
    """
    by_key: dict[str, str] = {}
    duplicates: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            # is_message_name() and message_key() inline: this loop runs once per
            # file of a 100,000-message cold login. scandir never yields "".
            if name[0] == "." or "\n" in name or "\r" in name:
                continue
            # Regular files only, symlinks excluded: no Maildir writer makes links, and
            # one planted in a Maildir must not make a session read a file elsewhere.
            if not entry.is_file(follow_symlinks=False):
                continue
            key = name.partition(":")[0]
            if key in by_key:
                duplicates.append(name)
            else:
                by_key[key] = name
    return by_key, duplicates


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


@dataclass(slots=True)
class MaildirIndex:
    """The whole index in memory: entries by key, in UID order."""

    uidvalidity: int
    next_uid: int = 1
    cur_mtime: int = 0
    entries: dict[str, IndexEntry] = field(default_factory=dict)
    written_in_new: int = 0
    """How many entries were in new/ when the file was last read or written."""

    def assign(self, key: str, size: int, path: str) -> IndexEntry:
        """Give a message the next UID; UIDs only grow, so none is ever reused."""
        entry = IndexEntry(self.next_uid, size, path)
        self.next_uid += 1
        self.entries[key] = entry
        return entry

    def uidl(self, uid: int) -> str:
        """The UIDL of a UID: 16+ hex digits, printable ASCII, stable while the index is."""
        return f"{self.uidvalidity:08x}{uid:08x}"

    def uidls(self) -> list[str]:
        """``uidl()`` of every entry in order, the UIDVALIDITY part formatted once."""
        prefix = f"{self.uidvalidity:08x}"
        return [prefix + format(entry.uid, "08x") for entry in self.entries.values()]

    def header(self) -> IndexHeader:
        return IndexHeader(
            uidvalidity=self.uidvalidity,
            next_uid=self.next_uid,
            count=len(self.entries),
            octets=sum(entry.size for entry in self.entries.values()),
            cur_mtime=self.cur_mtime,
            in_new=sum(1 for entry in self.entries.values() if entry.path.startswith("new/")),
        )


def _format_header(header: IndexHeader) -> str:
    return (
        f"{INDEX_MAGIC} {INDEX_VERSION} uidvalidity={header.uidvalidity:x}"
        f" next={header.next_uid} count={header.count} octets={header.octets}"
        f" cur_mtime={header.cur_mtime} in_new={header.in_new}\n"
    )


_HEADER_FIELDS: Final = ("uidvalidity", "next", "count", "octets", "cur_mtime", "in_new")


def _parse_header(line: str) -> IndexHeader:
    tokens = line.split()
    if len(tokens) < 2 or tokens[0] != INDEX_MAGIC:
        raise CorruptIndex("not a popbox index")
    values: dict[str, int] = {}
    for token in tokens[2:]:
        name, _, value = token.partition("=")
        try:
            values[name] = int(value, 16 if name == "uidvalidity" else 10)
        except ValueError:
            raise CorruptIndex(f"bad header field {token!r}") from None
    uidvalidity = values.get("uidvalidity")
    if tokens[1] != INDEX_VERSION:
        raise CorruptIndex(f"unknown index version {tokens[1]!r}", uidvalidity)
    missing = [name for name in _HEADER_FIELDS if name not in values]
    if missing or any(values[name] < 0 for name in _HEADER_FIELDS):
        raise CorruptIndex(f"bad header {line.strip()!r}", uidvalidity)
    return IndexHeader(
        uidvalidity=values["uidvalidity"],
        next_uid=values["next"],
        count=values["count"],
        octets=values["octets"],
        cur_mtime=values["cur_mtime"],
        in_new=values["in_new"],
    )


def read_header(maildir: Path) -> IndexHeader | None:
    """The index header, or None if there is no index or it is not readable as ours."""
    try:
        with (maildir / INDEX_NAME).open("r", encoding=_ENCODING, errors=_ERRORS) as handle:
            line = handle.readline(MAX_HEADER_LINE)
    except FileNotFoundError:
        return None
    try:
        return _parse_header(line)
    except CorruptIndex:
        return None


def read_index(maildir: Path) -> MaildirIndex | None:
    """Load the index; None if there is none. Raises CorruptIndex if it is damaged.

    Damage means anything that breaks the invariants this module writes: a header
    that disagrees with the lines, a UID out of order or not below ``next``, a
    duplicate key, a path outside cur/ and new/.
    """
    try:
        data = (maildir / INDEX_NAME).read_bytes()
    except FileNotFoundError:
        return None
    text = data.decode(_ENCODING, _ERRORS)
    header_line, _, body = text.partition("\n")
    header = _parse_header(header_line)
    index = MaildirIndex(
        header.uidvalidity, header.next_uid, header.cur_mtime, written_in_new=header.in_new
    )
    entries = index.entries
    previous_uid = 0
    octets = 0
    in_new = 0
    # The hot loop of a login on a big maildrop with no cached index: one split per
    # line and only the checks a line needs; duplicate keys and the UID ceiling are
    # caught once at the end (fewer entries than lines; the last UID below next).
    lines = 0
    for line in body.splitlines():
        lines += 1
        try:
            uid_text, size_text, path = line.split(" ", 2)
            uid = int(uid_text)
            size = int(size_text)
        except ValueError:
            raise CorruptIndex(f"bad line {line[:80]!r}", header.uidvalidity) from None
        prefix = path[:4]
        if prefix == "new/":
            in_new += 1
        elif prefix != "cur/":
            raise CorruptIndex(f"bad directory in {line[:80]!r}", header.uidvalidity)
        key = path[4:].partition(":")[0]
        if uid <= previous_uid or size < 0 or not key or key[0] == ".":
            raise CorruptIndex(f"inconsistent line {line[:80]!r}", header.uidvalidity)
        previous_uid = uid
        octets += size
        entries[key] = IndexEntry(uid, size, path)
    if previous_uid >= header.next_uid:
        raise CorruptIndex("a UID is not below next", header.uidvalidity)
    if (
        lines != header.count
        or len(entries) != lines
        or octets != header.octets
        or in_new != header.in_new
    ):
        raise CorruptIndex("header totals disagree with the lines", header.uidvalidity)
    return index


def _entry_lines(index: MaildirIndex) -> Iterable[str]:
    for entry in index.entries.values():
        yield f"{entry.uid} {entry.size} {entry.path}\n"


def write_index(maildir: Path, index: MaildirIndex) -> IndexSignature:
    """Replace the index atomically: temporary file, fsync, rename, directory fsync.

    A crash at any point leaves either the old index or the new one, never a mix; the
    caller holds the maildrop lock, so no other writer races for the temporary name.
    Returns the new file's signature.
    """
    header = index.header()
    text = _format_header(header) + "".join(_entry_lines(index))
    tmp_path = maildir / INDEX_TMP_NAME
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb", closefd=True) as handle:
            handle.write(text.encode(_ENCODING, _ERRORS))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, maildir / INDEX_NAME)
    except BaseException:
        # The original error is the one worth reporting.
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(maildir)
    index.written_in_new = header.in_new
    signature = index_signature(maildir)
    if signature is None:
        raise FileNotFoundError(errno.ENOENT, "index vanished after writing", str(maildir))
    return signature


IndexSignature = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns) of the index file: every write renames a new
file into place, so a new inode tells another process's write apart even where
mtimes are coarse."""


def index_signature(maildir: Path) -> IndexSignature | None:
    """The signature of the index file, or None if there is none."""
    try:
        st = os.stat(maildir / INDEX_NAME)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
