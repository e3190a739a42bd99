"""The on-disk format of the Maildir index, read and written whole.

Everything here is synchronous and raises plain ``OSError``; ``store.maildir`` runs it
in worker threads and translates errors. The index file (``popbox-index`` in the
Maildir's root, a sibling of cur/, new/ and tmp/) is one ASCII header line and then
three columns, every message in UID order (version 3)::

    popbox-maildir-index 3 uidvalidity=65f0a1b2 next=4 count=2 octets=9146 cur_mtime=0
        in_new=0 paths=97 crc=1c2b3a4d     (one line in the file)
    UIDs       count x 8 octets, unsigned little-endian
    sizes      count x 8 octets, unsigned little-endian (wire sizes)
    paths      DIR/FILENAME of each message, UTF-8 (surrogateescape), joined by LF

so that a process that has never seen the maildrop loads 100,000 messages with a few
C-level operations (``array.frombytes``, a checksum): no per-message object is made
until something changes, paths are split when a message is first read and UIDL
strings made when one is first asked for (docs/performance.md). ``crc`` is the
CRC-32 of everything after the header line. The UIDL listing is not stored: the
protocol core renders it once per index version and keeps it with the snapshot.

Older formats are read once and rewritten in this one at the next login, keeping
every UID, the UIDVALIDITY and ``next`` (so every UIDL): version 2 is version 3 with
a fourth column, the rendered UIDL listing (``uidls=`` in the header gives its
length), which is checked for length and skipped; version 1 is one text line per
message, ``UID WIRE_SIZE DIR/FILENAME``.

A message's key (what survives flag renames and new/ -> cur/ moves) is the file name
up to the first ``:``. ``next`` is the next UID to hand out; it only grows, so a UIDL
is never reused even after its message is deleted. ``count`` and ``octets`` are the
totals of the listed messages and ``cur_mtime`` the mtime of cur/ when the index was
written (0 when it was too recent to trust) and ``in_new`` how many listed messages
were still in new/; together they let a login skip listing cur/ and a quota check
skip reading past the header.

A message's UIDL is ``f"{uidvalidity:08x}{uid:08x}"`` (16 hex digits). A rebuilt
index takes a larger UIDVALIDITY (also noted in ``popbox.lock``), so no UIDL repeats.
"""

from __future__ import annotations

import errno
import itertools
import operator
import os
import sys
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from popbox.fileio import replace_file
from popbox.store.index import (
    CorruptIndex,
    DeferredColumn,
    IndexColumns,
    IndexEntry,
    IndexHeader,
    MaildirIndex,
)

__all__ = [
    "INDEX_NAME",
    "INDEX_TMP_NAME",
    "IndexSignature",
    "index_signature",
    "read_header",
    "read_index",
    "signature_of",
    "write_index",
]

INDEX_NAME: Final = "popbox-index"
# Written beside the index and renamed over it, so a crash leaves the old or the new.
INDEX_TMP_NAME: Final = "popbox-index.tmp"
# The first token of the header; a file that does not start with it is not ours.
INDEX_MAGIC: Final = "popbox-maildir-index"
# Bumped when the format changes; an unknown version is rebuilt, not guessed at.
INDEX_VERSION: Final = "3"
# The formats before it, read and then rewritten as the current version (their UIDs
# must survive; rebuilding would change every UIDL once): the columns with the
# rendered UIDL listing as a fourth, and the text format, one line per message.
INDEX_VERSION_LISTING: Final = "2"
INDEX_VERSION_TEXT: Final = "1"
# UIDs and sizes are stored as unsigned 64-bit little-endian words.
_WORD_TYPE: Final = "Q"
_WORD: Final = 8
_SWAP: Final = sys.byteorder != "little"
# A header line is short; reading at most this much keeps a garbage file from costing
# memory when only the header is wanted (quota checks).
MAX_HEADER_LINE: Final = 4096
# The text encoding of the index: Maildir names are bytes to the kernel, and
# surrogateescape carries any non-UTF-8 name through unchanged.
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"


def _format_header(header: IndexHeader, paths: int, crc: int) -> str:
    return (
        f"{INDEX_MAGIC} {INDEX_VERSION} uidvalidity={header.uidvalidity:x}"
        f" next={header.next_uid} count={header.count} octets={header.octets}"
        f" cur_mtime={header.cur_mtime} in_new={header.in_new}"
        f" paths={paths} crc={crc:08x}\n"
    )


_HEADER_FIELDS: Final = ("uidvalidity", "next", "count", "octets", "cur_mtime", "in_new")
# Fields only the column formats have: the lengths of their text columns, a checksum.
_COLUMN_FIELDS: Final = {
    INDEX_VERSION: ("paths", "crc"),
    INDEX_VERSION_LISTING: ("paths", "uidls", "crc"),
    INDEX_VERSION_TEXT: (),
}
_HEX_FIELDS: Final = frozenset({"uidvalidity", "crc"})


def _parse_header(line: str) -> tuple[IndexHeader, str, dict[str, int]]:
    """The header, the format version and every numeric field by name."""
    tokens = line.split()
    if len(tokens) < 2 or tokens[0] != INDEX_MAGIC:
        raise CorruptIndex("not a popbox index")
    values: dict[str, int] = {}
    for token in tokens[2:]:
        name, _, value = token.partition("=")
        try:
            values[name] = int(value, 16 if name in _HEX_FIELDS else 10)
        except ValueError:
            raise CorruptIndex(f"bad header field {token!r}") from None
    uidvalidity = values.get("uidvalidity")
    version = tokens[1]
    if version not in _COLUMN_FIELDS:
        raise CorruptIndex(f"unknown index version {version!r}", uidvalidity)
    wanted = _HEADER_FIELDS + _COLUMN_FIELDS[version]
    missing = [name for name in wanted if name not in values]
    if missing or any(values[name] < 0 for name in wanted):
        raise CorruptIndex(f"bad header {line.strip()!r}", uidvalidity)
    header = IndexHeader(
        uidvalidity=values["uidvalidity"],
        next_uid=values["next"],
        count=values["count"],
        octets=values["octets"],
        cur_mtime=values["cur_mtime"],
        in_new=values["in_new"],
    )
    return header, version, values


def read_header(maildir: Path) -> IndexHeader | None:
    """The index header, or None if there is no index or it is not readable as ours."""
    try:
        fd = os.open(maildir / INDEX_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, MAX_HEADER_LINE)
    finally:
        os.close(fd)
    try:
        return _parse_header(data.partition(b"\n")[0].decode("ascii", "replace"))[0]
    except CorruptIndex:
        return None


def read_index(maildir: Path) -> MaildirIndex | None:
    """Load the index; None if there is none. Raises CorruptIndex if it is damaged.

    Damage means anything that breaks the invariants this module writes: a checksum
    or header that disagrees with the columns, a UID out of order or not below
    ``next``, a path outside cur/ and new/. A file in an older format is read as it
    always was and comes back with ``outdated_format`` set, for the caller to write it
    anew.
    """
    try:
        data = (maildir / INDEX_NAME).read_bytes()
    except FileNotFoundError:
        return None
    end = data.find(b"\n")
    header_line = data[: end if end >= 0 else len(data)]
    header, version, values = _parse_header(header_line.decode("ascii", "replace"))
    if version == INDEX_VERSION_TEXT:
        index = _read_text_lines(header, data[end + 1 :].decode(_ENCODING, _ERRORS))
    else:
        index = _read_columns(header, values, memoryview(data)[end + 1 :])
    index.outdated_format = version != INDEX_VERSION
    return index


def _read_columns(header: IndexHeader, values: dict[str, int], body: memoryview) -> MaildirIndex:
    """Versions 3 and 2: the columns, checked in C-level passes (no per-message Python).

    Version 2's fourth column, the UIDL listing it stored, is derived data: its lines
    are counted and it is dropped (the UIDLs come from the UIDs, as they always did).
    """
    uidvalidity = header.uidvalidity
    count = header.count
    numbers = count * _WORD
    paths_end = 2 * numbers + values["paths"]
    listing_length = values.get("uidls", 0)
    if len(body) != paths_end + listing_length or zlib.crc32(body) != values["crc"]:
        raise CorruptIndex("the columns do not match the header's checksum", uidvalidity)
    uids = array(_WORD_TYPE)
    uids.frombytes(body[:numbers])
    sizes = array(_WORD_TYPE)
    sizes.frombytes(body[numbers : 2 * numbers])
    if _SWAP:
        uids.byteswap()
        sizes.byteswap()
    paths = body[2 * numbers : paths_end].tobytes()
    # A name holds no "/" and no LF, so these count path starts: every path is in
    # cur/ or new/. Names themselves (no dotfiles, no line breaks) are the writer's
    # to keep right, as it takes them from scan_messages; the CRC covers damage.
    # Single C-level passes: a warm login on a big maildrop pays for each.
    in_new = paths.count(b"\nnew/") + paths.startswith(b"new/")
    in_cur = paths.count(b"\ncur/") + paths.startswith(b"cur/")
    if (
        ("uidls" in values and body[paths_end:].tobytes().count(b"\r\n") != count)
        or paths.count(b"\n") != max(count - 1, 0)
        or in_new + in_cur != count
        or in_new != header.in_new
    ):
        raise CorruptIndex("column lengths or paths disagree with the header", uidvalidity)
    if count and (
        uids[0] < 1
        or uids[-1] >= header.next_uid
        or not all(map(operator.lt, uids, itertools.islice(uids, 1, None)))
    ):
        raise CorruptIndex("UIDs out of order or not below next", uidvalidity)
    if sum(sizes) != header.octets:
        raise CorruptIndex("header totals disagree with the columns", uidvalidity)
    index = MaildirIndex(
        uidvalidity,
        header.next_uid,
        header.cur_mtime,
        written_in_new=header.in_new,
    )
    columns = IndexColumns(
        uids,
        sizes.tolist(),
        DeferredColumn(count, lambda: _split_paths(paths), paths),
        index.uidl_column(uids),
    )
    index.take_columns(columns)
    return index


def _split_paths(data: bytes) -> list[str]:
    return data.decode(_ENCODING, _ERRORS).split("\n") if data else []


def _read_text_lines(header: IndexHeader, body: str) -> MaildirIndex:
    """Version 1: one ``UID WIRE_SIZE DIR/FILENAME`` line per message."""
    index = MaildirIndex(
        header.uidvalidity, header.next_uid, header.cur_mtime, written_in_new=header.in_new
    )
    entries = index.entries
    previous_uid = 0
    octets = 0
    in_new = 0
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


def _packed(numbers: Sequence[int]) -> bytes:
    words = numbers if isinstance(numbers, array) else array(_WORD_TYPE, numbers)
    if _SWAP:
        words = array(_WORD_TYPE, words)
        words.byteswap()
    return words.tobytes()


def write_index(
    maildir: Path,
    index: MaildirIndex,
    columns: IndexColumns | None = None,
    *,
    durable: bool = True,
) -> IndexSignature:
    """Replace the index atomically: temporary file, fsync, rename, directory fsync.

    A crash at any point leaves either the old index or the new one, never a mix; the
    caller holds the maildrop lock, so no other writer races for the temporary name.
    ``columns`` is ``index.columns()`` if the caller has it already. Returns the new
    file's signature.

    ``durable=False`` leaves out the directory fsync, for a caller to whom the old
    index coming back after a crash is as good as the new one (one that only dropped
    entries whose files are durably gone: the next login's reconcile drops them
    again). The file is still fsynced before the rename, so whichever index is
    found is whole.
    """
    if columns is None:
        columns = index.columns()
    header = index.header(columns)
    if isinstance(columns.paths, DeferredColumn) and columns.paths.source is not None:
        paths = columns.paths.source  # unchanged since read: as it was
    else:
        paths = "\n".join(columns.paths).encode(_ENCODING, _ERRORS)
    body = b"".join((_packed(columns.uids), _packed(columns.sizes), paths))
    head = _format_header(header, len(paths), zlib.crc32(body)).encode("ascii")
    replace_file(maildir, INDEX_NAME, INDEX_TMP_NAME, (head, body), durable=durable)
    index.written_in_new = header.in_new
    index.outdated_format = False
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
    return signature_of(maildir / INDEX_NAME)


def signature_of(path: Path) -> IndexSignature | None:
    """The signature of the index file at ``path``, or None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
