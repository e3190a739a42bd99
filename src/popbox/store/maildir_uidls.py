"""UIDLs kept from the server popbox replaced: ``popbox.uidls`` beside a folder's index.

A message popbox delivers with an imported UIDL (``MaildirStore.deliver(uidl=)``), or
one already in the Maildir that ``adopt_uidls`` gives one, keeps that UIDL forever
instead of popbox's own. Its UID stays popbox's (the device state is kept by UID);
only the string served for it changes. The file holds one line per message::

    KEY<TAB>UIDL<LF>

KEY is the Maildir file name up to its first ``:`` (what survives flag renames and
new/ -> cur/ moves), UIDL 1-70 octets of 0x21-0x7E (RFC 1939 section 7). A delivery
appends its line (O_APPEND, then fsync) before it links the message into new/, since
the UID is only given at the next session's scan: a message in new/ always has its
line, and a line whose message never arrived is harmless. Deliveries stay free of
the session lock; they take a ``flock`` on this file for the append only, so that a
compaction (which replaces the file, under the folder's lock) never drops a line
appended meanwhile. A line that is not whole (a crash mid-append) or not of this
shape is ignored.

Which message serves a UIDL, the rule every snapshot follows (``resolve``): messages
are taken in UID order; a message's first line counts; a UIDL already served for a
lower UID, or in popbox's own form for this index (``f"{uidvalidity:08x}{uid:08x}"``,
which belongs to the UID it names, served or still to come), is not served again: that
message gets popbox's own UIDL and a WARNING is logged. The losing line is then dropped
from the file at once, so the decision stands even when the winner goes or the index
is rebuilt with another UIDVALIDITY: a UIDL once served for one message is never served
for another, and a message keeps the UIDL it was first served. Removals drop the lines
of messages that are gone (``compact``).

Everything here is synchronous and raises plain OSError for the caller to translate.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import methodcaller
from pathlib import Path
from typing import Final

from popbox.errors import InvalidUidl
from popbox.fileio import fsync_dir, replace_file, write_all
from popbox.store.index import MaildirIndex, scan_messages
from popbox.store.index_file import IndexSignature, signature_of
from popbox.store.mailbox import MAX_UIDL_LENGTH, AdoptReport, check_uidl

__all__ = [
    "UIDLS_NAME",
    "UIDLS_TMP_NAME",
    "Resolution",
    "UidlJournal",
    "adopt",
    "append_uidls",
    "apply_uidls",
    "check_key",
    "compact",
    "drop_gone",
    "is_own_form",
    "read_uidls",
    "resolve",
]

log = logging.getLogger(__name__)

UIDLS_NAME: Final = "popbox.uidls"
# Written beside the file and renamed over it by a compaction.
UIDLS_TMP_NAME: Final = "popbox.uidls.tmp"
# Maildir file names and UIDLs are stored as the index stores names: any bytes survive.
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"
# Files of a Maildir are private to the mail owner (Dovecot, Postfix).
FILE_MODE: Final = 0o600
# One line: a key (no TAB, LF or CR, not a dotfile) and a UIDL of 0x21-0x7E.
_LINE: Final = re.compile(
    rf"([^\t\n\r.][^\t\n\r]*)\t([\x21-\x7e]{{1,{MAX_UIDL_LENGTH}}})", re.ASCII
)
# The same, for every line of a file at once.
_LINES: Final = re.compile(
    rf"^([^\t\n\r.][^\t\n\r]*)\t([\x21-\x7e]{{1,{MAX_UIDL_LENGTH}}})$", re.ASCII | re.M
)
# Lowercase hex, as popbox's own UIDLs are made.
_HEX: Final = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class UidlJournal:
    """The file as read: each key's first UIDL, in file order, and the file's
    signature (index_file.signature_of) to tell when it changed."""

    uidls: dict[str, str]
    signature: IndexSignature | None


@dataclass(slots=True)
class Resolution:
    """What a snapshot serves: the kept UIDL by UID, and the keys that lost theirs."""

    overrides: dict[int, str] = field(default_factory=dict)
    losers: list[str] = field(default_factory=list)


def is_own_form(uidl: str, uidvalidity: int) -> bool:
    """Whether ``uidl`` is what popbox makes itself for some UID of an index with this
    UIDVALIDITY (index.MaildirIndex.uidl_template)."""
    prefix = f"{uidvalidity:08x}"
    if not uidl.startswith(prefix):
        return False
    rest = uidl[len(prefix) :]
    return _HEX.fullmatch(rest) is not None and f"{int(rest, 16):08x}" == rest


def check_key(key: str) -> str:
    """``key`` unchanged if it can name a message in the file, else ValueError."""
    if _LINE.fullmatch(f"{key}\tx") is None:
        raise ValueError(f"{key[:60]!r} cannot be a Maildir message key")
    return key


def _format(lines: Iterable[tuple[str, str]]) -> bytes:
    return "".join(f"{key}\t{uidl}\n" for key, uidl in lines).encode(_ENCODING, _ERRORS)


def _parse(data: bytes) -> dict[str, str]:
    """Each key's first UIDL, from the whole lines that have the shape (one C-level
    pass: a folder adopted whole has a line per message)."""
    text = data.decode(_ENCODING, _ERRORS)
    whole = text[: text.rfind("\n") + 1]  # a last line without its LF is not whole yet
    pairs: list[tuple[str, str]] = _LINES.findall(whole)
    uidls = dict(pairs)
    if len(uidls) != len(pairs):  # a key twice: its first line counts
        uidls = {}
        for key, uidl in pairs:
            uidls.setdefault(key, uidl)
    return uidls


def read_uidls(maildir: Path) -> UidlJournal | None:
    """The folder's file, or None if there is none."""
    try:
        fd = os.open(maildir / UIDLS_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> UidlJournal:
    st = os.fstat(fd)
    chunks = []
    offset = 0
    while chunk := os.pread(fd, max(st.st_size, 4096), offset):
        chunks.append(chunk)
        offset += len(chunk)
    signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return UidlJournal(_parse(b"".join(chunks)), signature)


@contextlib.contextmanager
def _locked(maildir: Path, *, create: bool) -> Iterator[int | None]:
    """The file open and ``flock``ed, checked to be the one at its name (a compaction
    may have replaced it while we waited); None if there is none and not ``create``."""
    path = maildir / UIDLS_NAME
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    while True:
        try:
            fd = os.open(path, flags | (os.O_CREAT if create else 0), FILE_MODE)
        except FileNotFoundError:
            if create:
                raise
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = signature_of(path)
            if current is not None and current[0] == os.fstat(fd).st_ino:
                yield fd
                return
        finally:
            os.close(fd)  # also drops the flock


def append_uidls(maildir: Path, lines: Iterable[tuple[str, str]]) -> None:
    """Append ``(key, uidl)`` lines durably: they survive a crash once this returns.

    Checked keys and UIDLs only (``check_key``, mailbox.check_uidl). Waits at most
    for a compaction of this small file, never for a session.
    """
    data = _format(lines)
    if not data:
        return
    with _locked(maildir, create=True) as fd:
        assert fd is not None
        fresh = os.fstat(fd).st_size == 0
        write_all(fd, data)
        os.fsync(fd)
    if fresh:
        fsync_dir(maildir)  # a file just made (or left empty): its name must last too


def compact(maildir: Path, keep: Callable[[str, str], bool]) -> UidlJournal | None:
    """Rewrite the file with only the lines ``keep(key, uidl)`` is true for (each key's
    first); called with the folder's lock held. Lines appended meanwhile are read
    under the file's flock, so none is lost. Returns the file as it now is (None:
    gone, when nothing is kept)."""
    with _locked(maildir, create=False) as fd:
        if fd is None:
            return None
        journal = _read_fd(fd)
        kept = {key: uidl for key, uidl in journal.uidls.items() if keep(key, uidl)}
        if kept == journal.uidls:
            return journal
        if not kept:
            os.unlink(maildir / UIDLS_NAME)
            fsync_dir(maildir)
            return None
        replace_file(maildir, UIDLS_NAME, UIDLS_TMP_NAME, (_format(kept.items()),))
    return read_uidls(maildir)


def resolve(
    journal: UidlJournal, uids_by_key: Mapping[str, int], uidvalidity: int, folder: str
) -> Resolution:
    """Which message serves which kept UIDL in a snapshot (the module's rule)."""
    uidls = list(map(journal.uidls.__getitem__, uids_by_key))
    prefix = f"{uidvalidity:08x}"
    if len(set(uidls)) == len(uidls) and not any(map(methodcaller("startswith", prefix), uidls)):
        # Every UIDL once and none in popbox's own form (the usual case, and a whole
        # folder's worth after an import): all are served, found in C-level passes.
        return Resolution(dict(zip(uids_by_key.values(), uidls, strict=True)))
    resolution = Resolution()
    served: dict[str, str] = {}
    for key, uid in sorted(uids_by_key.items(), key=lambda item: item[1]):
        uidl = journal.uidls[key]
        if is_own_form(uidl, uidvalidity):
            log.warning(
                "folder %s: kept UIDL %s of %s is in popbox's own form; "
                "the message gets popbox's own UIDL",
                folder,
                uidl,
                key,
            )
        elif uidl in served:
            log.warning(
                "folder %s: kept UIDL %s of %s is already served for %s; "
                "the message gets popbox's own UIDL",
                folder,
                uidl,
                key,
                served[uidl],
            )
        else:
            served[uidl] = key
            resolution.overrides[uid] = uidl
            continue
        resolution.losers.append(key)
    return resolution


def apply_uidls(folder: str, maildir: Path, index: MaildirIndex) -> None:
    """Give ``index`` the kept UIDLs of the folder's file (read again only if it
    changed); drop the lines that lost (``resolve``). With the folder's lock held."""
    cached = index.uidl_journal
    signature = signature_of(maildir / UIDLS_NAME)
    if signature is None:
        if index.uidl_overrides or cached is not None:
            index.set_uidl_overrides({}, None)
        return
    if cached is not None and cached.signature == signature:
        journal: UidlJournal | None = cached
    else:
        journal = read_uidls(maildir)
    if journal is None:
        index.set_uidl_overrides({}, None)
        return
    resolution = resolve(journal, index.uids_by_key(journal.uidls), index.uidvalidity, folder)
    if resolution.losers:
        losers = set(resolution.losers)
        journal = compact(maildir, lambda key, _uidl: key not in losers)
    index.set_uidl_overrides(resolution.overrides, journal)


def drop_gone(maildir: Path, index: MaildirIndex, gone: Collection[str]) -> None:
    """Drop the lines of messages no longer in the folder: ``gone`` (keys just
    removed) and any other key the index does not hold and no delivery is bringing
    (its file is neither in tmp/ nor in new/ or cur/). With the folder's lock held,
    after the removals are durable: a line dropped too early would cost its message
    the kept UIDL."""
    journal = index.uidl_journal
    if journal is None:
        return
    present = index.uids_by_key(journal.uidls)
    dropped = {key for key in journal.uidls if key in gone}
    others = [key for key in journal.uidls if key not in present and key not in dropped]
    if others:
        arriving = {key for key in others if os.path.lexists(maildir / "tmp" / _base(key))}
        listed: set[str] = set()
        for directory in ("new", "cur"):  # after tmp/: a delivery links before it unlinks
            listed.update(scan_messages(maildir / directory)[0])
        dropped.update(key for key in others if key not in arriving and key not in listed)
    if dropped:
        index.uidl_journal = compact(maildir, lambda key, _uidl: key not in dropped)


def _base(key: str) -> str:
    """The name a delivery writes in tmp/: the key before its size fields."""
    return key.partition(",")[0]


def adopt(
    folder: str, maildir: Path, index: MaildirIndex, uidls: Mapping[str, str]
) -> tuple[AdoptReport, bool]:
    """Give the messages of ``index`` whose keys are in ``uidls`` those UIDLs, by
    appending the lines that are new; with the folder's lock held and the index just
    brought up to date. The report, and whether any line was written (the index
    then serves them already)."""
    apply_uidls(folder, maildir, index)  # what the folder serves now, losers dropped
    present = index.uids_by_key(uidls)
    kept = index.uidl_overrides
    served = {uidl for uid, uidl in kept.items()}
    adopted: list[str] = []
    already: list[str] = []
    missing: list[str] = []
    invalid: list[str] = []
    lines: list[tuple[str, str]] = []
    for key, uidl in uidls.items():
        try:
            check_uidl(uidl)
            check_key(key)
        except (InvalidUidl, ValueError):
            invalid.append(key)
            continue
        uid = present.get(key)
        if uid is None:
            missing.append(key)
        elif kept.get(uid) == uidl:
            already.append(key)
        elif uid in kept or uidl in served or is_own_form(uidl, index.uidvalidity):
            invalid.append(key)
        else:
            served.add(uidl)
            adopted.append(key)
            lines.append((key, uidl))
    if lines:
        append_uidls(maildir, lines)
        apply_uidls(folder, maildir, index)
    if invalid:
        log.warning(
            "folder %s: %d kept UIDLs not adopted (not RFC 1939's, popbox's own form, "
            "or served for another message)",
            folder,
            len(invalid),
        )
    report = AdoptReport(tuple(adopted), tuple(already), tuple(missing), tuple(invalid))
    return report, bool(lines)
