"""Courier's Maildir: ``courierpop3dsizelist`` and the UIDLs Courier's pop3d showed.

Courier's pop3d (courier-imap's pop3dserver.c) keeps, in each Maildir, one header line
and one line per message::

    /<version> <next uid> <uidvalidity>        version 3 (2 is read too)
    <filename> <size> <uid>:<uidvalidity>:<utf8>   version 3
    <filename> <size> <uid>:<uidvalidity>          version 2

The file name is the last file name seen, info and all; the two last spaces split a
line, so a name may hold spaces. Courier shows ``UID<uid>-<uidvalidity>`` (or
``UID<uid>`` when the uidvalidity is 0), and lists messages by the time at the start
of the name, then by the name up to ':'. A Maildir without the list (Courier's pop3d
before UIDs, "version 0") showed the file name up to ':' with every octet outside
0x21-0x7E and ``'``, ``"`` and ``+`` written as ``+XX`` (hex): that is what is used
then. Courier adds every message to the list at login before it lists them, so a
message missing from an existing list was never shown to a client: popbox gives it
a UIDL of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from popbox.migrate.maildirs import message_files
from popbox.migrate.plan import SourceMessage

__all__ = [
    "SIZELIST_NAME",
    "CourierFolder",
    "Sizelist",
    "courier_sources",
    "courier_v0_uidl",
    "parse_sizelist",
]

SIZELIST_NAME: Final = "courierpop3dsizelist"
# The versions Courier's pop3d reads (LISTVERSION and LISTVERSION-1).
VERSIONS: Final = (2, 3)
# A list bigger than this is refused: 200 octets a message for five million messages.
MAX_SIZELIST_BYTES: Final = 1024 * 1024 * 1024
# pop3dserver.c reads lines into a 2048-octet buffer and cuts longer ones.
MAX_LINE: Final = 2048 - 20


@dataclass(frozen=True, slots=True)
class SizelistEntry:
    filename: str
    size: int
    uid: int
    uidvalidity: int
    line: int

    @property
    def uidl(self) -> str:
        return f"UID{self.uid}-{self.uidvalidity}" if self.uidvalidity else f"UID{self.uid}"


@dataclass(slots=True)
class Sizelist:
    version: int | None = None
    next_uid: int | None = None
    uidvalidity: int | None = None
    entries: list[SizelistEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_sizelist(data: bytes) -> Sizelist:
    """Read a courierpop3dsizelist; unreadable lines are reported, as Courier skips them."""
    sizelist = Sizelist()
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    header = lines[0].split() if lines else []
    if (
        not lines[0].startswith("/")
        or len(header) < 2
        or not all(word.isdigit() for word in [header[0][1:], *header[1:3]])
        or int(header[0][1:]) not in VERSIONS
    ):
        # Courier itself starts afresh then: every message gets a new UIDL.
        sizelist.problems.append(f"line 1: not a version 2 or 3 header: {lines[0][:80]!r}")
        return sizelist
    sizelist.version = int(header[0][1:])
    sizelist.next_uid = int(header[1])
    sizelist.uidvalidity = int(header[2]) if len(header) > 2 else None
    tail = lines[1:]
    if tail and tail[-1] == "":
        tail.pop()
    elif tail:
        # Courier reads only lines that end in a line feed.
        sizelist.problems.append(f"line {len(lines)}: no line end, left out")
        tail.pop()
    for number, line in enumerate(tail, start=2):
        entry = _entry(number, line[:MAX_LINE])
        if isinstance(entry, str):
            sizelist.problems.append(f"line {number}: {entry}: {line[:80]!r}")
        else:
            sizelist.entries.append(entry)
    return sizelist


def _entry(number: int, line: str) -> SizelistEntry | str:
    name_and_size, space, uids = line.rpartition(" ")
    if not space:
        return "no fields"
    filename, space, size = name_and_size.rpartition(" ")
    if not space or not filename:
        return "no file name"
    parts = uids.split(":")
    if not size.isdigit() or len(parts) < 2 or not all(part.isdigit() for part in parts[:3]):
        return "no size and uid:uidvalidity"
    if len(parts) > 3:
        return "too many ':' fields"
    uid = int(parts[0])
    if uid == 0:
        return "UID 0"
    return SizelistEntry(filename, int(size), uid, int(parts[1]), number)


def courier_v0_uidl(key: str) -> str:
    """The UIDL Courier's pop3d showed before it kept a list: the encoded file name."""
    out: list[str] = []
    for octet in key.encode("utf-8", "surrogateescape"):
        if octet < 0x21 or octet > 0x7E or octet in b"'\"+":
            out.append(f"+{octet:02X}")
        else:
            out.append(chr(octet))
    return "".join(out)


def courier_order(key: str) -> tuple[int, str]:
    """pop3dserver.c's cmpmsgs: the leading number (atol), then the name up to ':'."""
    stripped = key.lstrip(" \t")
    sign = -1 if stripped.startswith("-") else 1
    body = stripped[1:] if stripped[:1] in "+-" else stripped
    digits = len(body) - len(body.lstrip("0123456789"))
    return (sign * int(body[:digits]) if digits else 0), key


@dataclass(slots=True)
class CourierFolder:
    sources: list[SourceMessage] = field(default_factory=list)
    missing: list[SourceMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unreadable: str | None = None
    """Why the list, which is there, could not be read (run.plan_maildir refuses)."""


def courier_sources(maildir: Path) -> CourierFolder:
    """The messages of one Courier Maildir folder with the UIDLs Courier showed."""
    folder = CourierFolder()
    files = message_files(maildir)
    for key in files.duplicates:
        folder.problems.append(f"{key}: two files with this key; the first is imported")
    path = maildir / SIZELIST_NAME
    sizelist: Sizelist | None
    try:
        size = path.stat().st_size
        if size > MAX_SIZELIST_BYTES:
            raise ValueError(f"{size} octets, more than {MAX_SIZELIST_BYTES}")
        sizelist = parse_sizelist(path.read_bytes())
    except FileNotFoundError:
        sizelist = None
    except (OSError, ValueError) as exc:
        # Not "no list" (file names as UIDLs): every message would lose its UIDL.
        folder.unreadable = f"{path} cannot be read: {exc}"
        return folder
    if sizelist is None:
        folder.problems.append(
            f"no {SIZELIST_NAME}: UIDLs are the file names, as Courier's pop3d showed them "
            "before it kept the list"
        )
        for key in sorted(files.by_key, key=courier_order):
            folder.sources.append(
                SourceMessage(key, files.by_key[key], courier_v0_uidl(key), "file name (version 0)")
            )
        return folder
    if sizelist.version is None:
        # Its entries cannot be trusted without the header: refuse rather than give
        # every message a new UIDL (a download again for every client).
        folder.unreadable = f"{path}: {sizelist.problems[0]}"
        return folder
    folder.problems.extend(f"{SIZELIST_NAME}: {problem}" for problem in sizelist.problems)
    by_key: dict[str, SizelistEntry] = {}
    for entry in sizelist.entries:
        key = entry.filename.rpartition("/")[2].partition(":")[0]
        if key in by_key:
            folder.problems.append(
                f"{SIZELIST_NAME}: line {entry.line}: {key} listed again; the first counts"
            )
            continue
        by_key[key] = entry
    for key in sorted(set(by_key) | set(files.by_key), key=courier_order):
        entry_or_none = by_key.get(key)
        file = files.by_key.get(key)
        if file is None:
            assert entry_or_none is not None
            folder.missing.append(SourceMessage(key, None, None, entry_or_none.uidl))
        elif entry_or_none is None:
            folder.sources.append(SourceMessage(key, file, None, "not in the list"))
        else:
            folder.sources.append(
                SourceMessage(
                    key, file, entry_or_none.uidl, f"{SIZELIST_NAME} line {entry_or_none.line}"
                )
            )
    return folder
