"""What ``popbox archive import`` reads: an mbox, a Maildir, a directory of .eml files
or a mail client's folder tree, as a stream of messages and the folders they were in.

What a path is, is decided by looking at it:

- a file beginning with ``From `` is an mbox (Thunderbird's folders are mboxo with
  ``From - date`` lines; popbox.archive.mboxrd reads both); any other ``.eml`` file
  is one message;
- a directory with ``cur/`` and ``new/`` is a Maildir; its ``.Name.Sub`` directories
  are Maildir++ folders (``Name/Sub``); ``tmp/`` is mail still being written and is
  left alone;
- any other directory is walked: its mboxes, its ``.eml`` files, Thunderbird's
  ``Name.sbd`` directories (the subfolders of the mbox ``Name``) and its other
  directories, each a folder of the same name; Thunderbird's ``.msf`` summaries and
  any file that is not mail are passed over.

Folders are named by their path below what was given, joined with ``/``; messages
directly in a Maildir or a walked directory go to ``INBOX``, and a single mbox to a
folder named after its file. ``folder`` (``--folder``) names the top instead.

Nothing here reads more than one message into memory, and a large one not even that:
one above SPOOL_THRESHOLD is copied to a temporary file in ``spool``
(``SourceMessage.spooled``: the reader of the stream removes it once the message is
kept). Below what was given, symbolic links are never followed, to files or to
directories: a loop would never end, and a link to a file the user may not read
would take it into their archive when root runs the import.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from popbox.archive.mboxrd import SPOOL_THRESHOLD, read_mbox
from popbox.errors import ArchiveError

__all__ = [
    "DEFAULT_FOLDER",
    "Expunged",
    "SourceItem",
    "SourceMessage",
    "Unreadable",
    "read_source",
    "source_octets",
]

# Where messages with no folder of their own go, as POP3 and every Maildir name it.
DEFAULT_FOLDER: Final = "INBOX"
# Thunderbird's summary files beside each mbox: an index, never mail.
_SUMMARY_SUFFIX: Final = ".msf"
# Thunderbird's directory of the subfolders of the mbox of the same name.
_SUBFOLDERS_SUFFIX: Final = ".sbd"


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """One message read: its octets (or a file holding them), its folder, and where
    it was found (for a report)."""

    folder: str
    content: bytes | Path
    size: int
    where: str
    spooled: bool = False
    """``content`` is a temporary file of the spool, to remove once it is kept."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A message (or a file) that could not be read, and why."""

    where: str
    reason: str


@dataclass(frozen=True, slots=True)
class Expunged:
    """A message Thunderbird marked deleted and had not compacted away yet."""

    where: str


SourceItem = SourceMessage | Unreadable | Expunged


def read_source(path: Path, spool: Path, folder: str | None = None) -> Iterator[SourceItem]:
    """Every message under ``path``, in a stable order (names sorted).

    ArchiveError if ``path`` is neither a directory nor an mbox or .eml file.
    """
    try:
        # What was named may be a link; what is found below it is never followed.
        path = path.resolve(strict=True)
        info = path.stat()
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        return _walk(path, path, folder or "", spool)
    if not stat.S_ISREG(info.st_mode):
        raise ArchiveError(f"{path} is neither a file nor a directory")
    if _is_mbox(path):
        return _read_mbox_file(path, path.name, folder or path.name, spool)
    if path.suffix.lower() == ".eml":
        return iter([_read_file(path, path.name, folder or DEFAULT_FOLDER, spool)])
    raise ArchiveError(
        f"{path} is not an mbox (it does not begin with a From line) nor an .eml file"
    )


def source_octets(path: Path) -> int:
    """About how many octets ``read_source`` will read (for a progress bar)."""
    if not path.is_dir():
        try:
            return path.stat().st_size
        except OSError:
            return 0
    total = 0
    for directory, dirs, files in os.walk(path):
        dirs[:] = [name for name in dirs if name != "tmp"]
        for name in files:
            if not name.endswith(_SUMMARY_SUFFIX):
                try:
                    total += os.lstat(os.path.join(directory, name)).st_size
                except OSError:
                    continue
    return total


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def _open(path: Path) -> BinaryIO:
    """``path`` for reading, never through a symbolic link: an import run by root on
    a user's directory must not take in /etc/shadow because a link there is named
    ``mail.eml``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_mbox(path: Path) -> bool:
    try:
        with _open(path) as fp:
            return fp.read(5) == b"From "
    except OSError:
        return False


def _walk(root: Path, directory: Path, prefix: str, spool: Path) -> Iterator[SourceItem]:
    if _is_maildir(directory):
        yield from _read_maildir(root, directory, prefix, spool)
        return
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as exc:
        yield Unreadable(_where(root, directory), exc.strerror or str(exc))
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            is_file = entry.is_file(follow_symlinks=False)
        except OSError as exc:
            yield Unreadable(_where(root, path), exc.strerror or str(exc))
            continue
        if is_dir:
            name = entry.name
            if name.endswith(_SUBFOLDERS_SUFFIX):
                name = name[: -len(_SUBFOLDERS_SUFFIX)]
            yield from _walk(root, path, _join(prefix, name), spool)
        elif is_file and not entry.name.endswith(_SUMMARY_SUFFIX):
            if entry.name.lower().endswith(".eml"):
                yield _read_file(path, _where(root, path), prefix or DEFAULT_FOLDER, spool)
            elif _is_mbox(path):
                where = _where(root, path)
                yield from _read_mbox_file(path, where, _join(prefix, entry.name), spool)


def _read_maildir(root: Path, directory: Path, prefix: str, spool: Path) -> Iterator[SourceItem]:
    yield from _maildir_messages(root, directory, prefix or DEFAULT_FOLDER, spool)
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        yield Unreadable(_where(root, directory), exc.strerror or str(exc))
        return
    for name in names:
        sub = directory / name
        # Maildir++: ".Sent.2023" is the folder Sent/2023, beside INBOX (not in it).
        hidden = name.startswith(".") and name not in (".", "..")
        if hidden and not sub.is_symlink() and _is_maildir(sub):
            parts = [part for part in name[1:].split(".") if part]
            if parts:
                yield from _maildir_messages(root, sub, _join(prefix, "/".join(parts)), spool)


def _maildir_messages(
    root: Path, directory: Path, folder: str, spool: Path
) -> Iterator[SourceItem]:
    for part in ("new", "cur"):
        try:
            entries = sorted(os.scandir(directory / part), key=lambda entry: entry.name)
        except OSError as exc:
            yield Unreadable(_where(root, directory / part), exc.strerror or str(exc))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError as exc:
                yield Unreadable(_where(root, path), exc.strerror or str(exc))
                continue
            yield _read_file(path, _where(root, path), folder, spool)


def _read_file(path: Path, where: str, folder: str, spool: Path) -> SourceItem:
    """One whole-file message: its octets, or (if large) a copy in the spool.

    Copied, not handed on by name: the name could be made a link between this look
    and the archive's; what was opened here cannot.
    """
    try:
        with _open(path) as fp:
            data = fp.read(SPOOL_THRESHOLD + 1)
            if len(data) <= SPOOL_THRESHOLD:
                if not data:
                    return Unreadable(where, "empty file")
                return SourceMessage(folder, data, len(data), where)
            fd, name = tempfile.mkstemp(dir=spool, suffix=".eml")
            with os.fdopen(fd, "wb") as copy:
                copy.write(data)
                del data
                shutil.copyfileobj(fp, copy)
                size = copy.tell()
    except OSError as exc:
        return Unreadable(where, exc.strerror or str(exc))
    return SourceMessage(folder, Path(name), size, where, spooled=True)


def _read_mbox_file(path: Path, where: str, folder: str, spool: Path) -> Iterator[SourceItem]:
    try:
        fp = _open(path)
    except OSError as exc:
        yield Unreadable(where, exc.strerror or str(exc))
        return
    with fp:
        messages = read_mbox(fp, spool)
        while True:
            try:
                message = next(messages)
            except StopIteration:
                return
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                yield Unreadable(where, reason or str(exc))
                return
            at = f"{where} message {message.number}"
            if message.expunged:
                if isinstance(message.content, Path):
                    message.content.unlink(missing_ok=True)
                yield Expunged(at)
            elif message.size == 0:
                yield Unreadable(at, "empty message")
            else:
                spooled = isinstance(message.content, Path)
                yield SourceMessage(folder, message.content, message.size, at, spooled)


def _where(root: Path, path: Path) -> str:
    try:
        relative = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(relative) if str(relative) != "." else str(path)
