"""Dovecot's Maildir: ``dovecot-uidlist`` and the UIDLs Dovecot's POP3 server showed.

The uidlist (src/lib-storage/index/maildir/maildir-uidlist.c) is one header line and
one line per message, in UID order::

    version 1:  1 <uidvalidity> <next uid>
                <uid> <filename>
    version 3:  3 V<uidvalidity> N<next uid> G<mailbox guid> [more fields]
                <uid> [<KEY><value> ...] :<filename>

A record's fields are one capital letter and a value: ``P`` the POP3 UIDL saved by
``pop3_save_uidl`` or a migration (an empty ``P`` means the base file name), ``G``
the message GUID, ``O`` the POP3 order, ``S``/``W`` sizes. Dovecot's POP3 server
(src/pop3/pop3-commands.c, ``pop3_get_uid``) shows a message the ``P`` field if
there is one, else (with ``pop3_reuse_xuidl``) its X-UIDL header, else
``pop3_uidl_format`` expanded (popbox.migrate.template); it lists messages with an
``O`` field first, by it, then the rest by UID.

Damage is met line by line, never with a guess: a record that does not parse is
reported and its message treated as never listed (popbox gives it a UIDL of its own;
clients fetch it once more, the safe direction). Dovecot itself would throw the
whole file away and renumber every message.

Mail in new/ that the uidlist does not name yet was never shown to a POP3 client:
Dovecot writes a message into the uidlist before any session can list it. It gets a
UIDL from popbox, not a guess at the UID Dovecot would have given it next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from popbox.migrate.maildirs import header_lines, message_files, read_header
from popbox.migrate.plan import SourceMessage
from popbox.migrate.template import TemplateError, UidlTemplate, UidlVariables
from popbox.migrate.xuidl import xuidl_of
from popbox.store.index import arrival_order

__all__ = [
    "UIDLIST_NAME",
    "DovecotFolder",
    "Uidlist",
    "UidlistRecord",
    "apop3d_header_md5",
    "dovecot_sources",
    "parse_uidlist",
]

UIDLIST_NAME: Final = "dovecot-uidlist"
# A uidlist bigger than this is refused: 100 octets a message for ten million messages.
MAX_UIDLIST_BYTES: Final = 1024 * 1024 * 1024
# maildir-uidlist.c: UIDs are 32-bit and (uint32_t)-1 is refused.
MAX_UID: Final = 0xFFFFFFFE


# A uidlist with nothing in it lists no message: as if there were none.
EMPTY_FILE: Final = "empty file"


@dataclass(frozen=True, slots=True)
class UidlistRecord:
    uid: int
    filename: str
    fields: dict[str, str]
    line: int


@dataclass(slots=True)
class Uidlist:
    version: int | None = None
    uidvalidity: int | None = None
    next_uid: int | None = None
    records: list[UidlistRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def by_key(self) -> dict[str, UidlistRecord]:
        return {record.filename.partition(":")[0]: record for record in self.records}


def _header(line: str, uidlist: Uidlist) -> None:
    if len(line) < 2 or not line[0].isdigit() or line[1] != " ":
        uidlist.problems.append("line 1: corrupt header (no version number)")
        return
    version = int(line[0])
    words = line[2:].split()
    if version == 1:
        if len(words) < 2 or not all(word.isdigit() for word in words[:2]):
            uidlist.problems.append("line 1: corrupt version 1 header")
            return
        uidvalidity, next_uid = int(words[0]), int(words[1])
    elif version == 3:
        values = {word[0]: word[1:] for word in words if word}
        try:
            uidvalidity = int(values.get("V", "0"))
            next_uid = int(values.get("N", "0"))
        except ValueError:
            uidlist.problems.append(f"line 1: corrupt header {line!r}")
            return
    else:
        uidlist.problems.append(f"line 1: unsupported uidlist version {version}")
        return
    uidlist.version = version
    if uidvalidity <= 0:
        uidlist.problems.append("line 1: no UIDVALIDITY")
        return
    uidlist.uidvalidity = uidvalidity
    uidlist.next_uid = next_uid


def _record(number: int, line: str, version: int) -> UidlistRecord | str:
    """One record, or why it cannot be one."""
    digits = len(line) - len(line.lstrip("0123456789"))
    if not digits or len(line) == digits or line[digits] != " ":
        return "no UID"
    uid = int(line[:digits])
    if not 0 < uid <= MAX_UID:
        return f"UID {uid} out of range"
    rest = line[digits:].lstrip(" ")
    fields: dict[str, str] = {}
    if version == 3:
        while rest and not rest.startswith(":"):
            word, _, rest = rest.partition(" ")
            rest = rest.lstrip(" ")
            if not "A" <= word[0] <= "Z":
                return f"invalid field {word!r}"
            fields.setdefault(word[0], word[1:])
        if not rest.startswith(":"):
            return "no ':' before the file name"
        rest = rest[1:]
    if not rest:
        return "no file name"
    if "/" in rest:
        return "file name with '/'"
    return UidlistRecord(uid, rest, fields, number)


def parse_uidlist(data: bytes) -> Uidlist:
    """Read a dovecot-uidlist; what cannot be read is in ``problems``, line by line."""
    uidlist = Uidlist()
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        uidlist.problems.append(EMPTY_FILE)
        return uidlist
    _header(lines[0], uidlist)
    if uidlist.version is None:
        return uidlist
    seen: dict[str, int] = {}
    previous = 0
    for number, line in enumerate(lines[1:], start=2):
        record = _record(number, line, uidlist.version)
        if isinstance(record, str):
            uidlist.problems.append(f"line {number}: {record}: {line[:80]!r}")
            continue
        if record.uid <= previous:
            uidlist.problems.append(f"line {number}: UID {record.uid} not above {previous}")
            continue
        previous = record.uid
        key = record.filename.partition(":")[0]
        if key in seen:
            # Dovecot keeps the later line (a file expunged and moved back).
            uidlist.problems.append(
                f"line {number}: {key} listed again (line {seen[key]}); the later UID counts"
            )
            uidlist.records = [r for r in uidlist.records if r.filename.partition(":")[0] != key]
        seen[key] = number
        uidlist.records.append(record)
    return uidlist


# The headers Dovecot's mbox "apop3d" header MD5 hashes (mbox-md5-apop3d.c).
_MD5_HEADERS: Final = frozenset({"date", "delivered-to", "message-id", "received", "x-delivery-id"})


def apop3d_header_md5(header: bytes) -> str:
    """Dovecot's header MD5 (``%m``), its ``mbox_md5 = apop3d`` way.

    Dovecot computes it only for mbox; an mbox turned into a Maildir keeps the same
    headers, so the UIDLs it served can still be recomputed. Date and Message-ID count
    until the first Received, of which only the first counts; Delivered-To and
    X-Delivery-ID always.
    """
    digest = hashlib.md5(usedforsecurity=False)
    seen_received = False
    in_first_received = False
    for name, value, continuation in header_lines(header):
        lowered = name.lower()
        if in_first_received and not continuation:
            in_first_received, seen_received = False, True
        if lowered not in _MD5_HEADERS:
            continue
        data = value.encode("utf-8", "surrogateescape")
        if lowered == "received":
            if not seen_received and (in_first_received or not continuation):
                in_first_received = True
                digest.update(data)
        elif lowered in ("date", "message-id"):
            if not seen_received and not in_first_received:
                digest.update(data)
        else:
            digest.update(data)
    return digest.hexdigest()


@dataclass(slots=True)
class DovecotFolder:
    """One folder read the Dovecot way: its messages in POP3 order, and what was wrong."""

    sources: list[SourceMessage] = field(default_factory=list)
    missing: list[SourceMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unreadable: str | None = None
    """Why the uidlist, which is there, could not be read (run.plan_maildir refuses)."""


def _pop3_order(records: Iterable[UidlistRecord]) -> list[UidlistRecord]:
    def key(record: UidlistRecord) -> tuple[int, int, int]:
        order = record.fields.get("O", "")
        if order.isdigit():
            return (0, int(order), record.uid)
        return (1, 0, record.uid)

    return sorted(records, key=key)


def dovecot_sources(
    maildir: Path, template: UidlTemplate, *, reuse_xuidl: bool = False
) -> DovecotFolder:
    """The messages of one Dovecot Maildir folder with the UIDLs Dovecot showed."""
    folder = DovecotFolder()
    files = message_files(maildir)
    for key in files.duplicates:
        folder.problems.append(f"{key}: two files with this key; the first is imported")
    path = maildir / UIDLIST_NAME
    try:
        size = path.stat().st_size
        if size > MAX_UIDLIST_BYTES:
            raise ValueError(f"{size} octets, more than {MAX_UIDLIST_BYTES}")
        uidlist = parse_uidlist(path.read_bytes())
    except FileNotFoundError:
        uidlist = Uidlist(problems=[f"no {UIDLIST_NAME}: Dovecot never listed this folder"])
    except (OSError, ValueError) as exc:
        # Not "no uidlist": every message would lose the UIDL clients keep.
        folder.unreadable = f"{path} cannot be read: {exc}"
        return folder
    if uidlist.version is None and uidlist.problems != [EMPTY_FILE]:
        # A header that cannot be read hides every record behind it: each message
        # would get a new UIDL and be downloaded again. Refuse rather than guess.
        folder.unreadable = f"{path}: {uidlist.problems[0]}"
        return folder
    folder.problems.extend(f"{UIDLIST_NAME}: {problem}" for problem in uidlist.problems)
    listed: set[str] = set()
    for record in _pop3_order(uidlist.records):
        key = record.filename.partition(":")[0]
        file = files.by_key.get(key)
        if file is None:
            folder.missing.append(SourceMessage(key, None, None, f"UID {record.uid}"))
            continue
        listed.add(key)
        uidl, origin = _uidl_of(record, key, file, uidlist, template, reuse_xuidl, folder.problems)
        folder.sources.append(SourceMessage(key, file, uidl, origin))
    for key in sorted(set(files.by_key) - listed, key=arrival_order):
        folder.sources.append(SourceMessage(key, files.by_key[key], None, "not in the uidlist"))
    return folder


def _uidl_of(
    record: UidlistRecord,
    key: str,
    file: Path,
    uidlist: Uidlist,
    template: UidlTemplate,
    reuse_xuidl: bool,
    problems: list[str],
) -> tuple[str | None, str]:
    saved = record.fields.get("P")
    if saved is not None:
        return (saved or key), "saved P field"
    if reuse_xuidl:
        header = xuidl_of(read_header(file))
        if header is not None:
            return header, "X-UIDL header (pop3_reuse_xuidl)"
    if uidlist.uidvalidity is None:
        problems.append(f"{key}: UID {record.uid} but no UIDVALIDITY to expand the template")
        return None, "no UIDVALIDITY"
    md5 = apop3d_header_md5(read_header(file)) if "md5" in template.names else None
    variables = UidlVariables(
        uid=record.uid,
        uidvalidity=uidlist.uidvalidity,
        filename=key,
        guid=record.fields.get("G") or None,
        md5=md5,
    )
    try:
        return template.render(variables), f"pop3_uidl_format {template.template}"
    except TemplateError as exc:
        problems.append(f"{key}: {exc}")
        return None, str(exc)
