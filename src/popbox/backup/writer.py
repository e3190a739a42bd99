"""Putting files into a snapshot being written: copies hashed on the way, hard links to
the previous snapshot for what cannot have changed, SQLite's online backup.

Only immutable files are linked (``rsync --link-dest`` style): Maildir message files
(Maildir never rewrites a message, a flag change renames it) and archive objects
(content-addressed). One is linked when the previous snapshot has it with the same
size and modification time, under the same path or, for a message, the same Maildir
key (the name up to ``:``), so a message moved from new/ to cur/ or given flags is
still linked. Its digest is then the previous manifest's. Anything else is copied:
read once, hashed while written, its modification time kept. Nothing is fsynced
file by file: the snapshot flushes the whole filesystem once before its manifest
(backup.snapshot), which costs far less than a disk flush per message.

Every file of a snapshot is private (0600) and every directory too (0700), as popbox
makes its Maildirs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.backup.manifest import (
    FILES_DIR,
    READ_CHUNK,
    BackupError,
    FileEntry,
    FileKind,
    Manifest,
    file_digest,
)

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "PreviousSnapshot",
    "SnapshotWriter",
    "WriteStats",
    "is_sqlite",
    "message_key",
]

# What popbox makes its Maildirs and files with (store.maildir_folders, fileio).
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
# The first 16 octets of every SQLite 3 database file (sqlite.org/fileformat.html).
SQLITE_MAGIC: Final = b"SQLite format 3\x00"
# How long a SQLite backup waits for a writer's lock before it gives up (milliseconds
# in SQLite's busy handler): a commit of the archive takes far less.
SQLITE_BUSY_TIMEOUT: Final = 60.0
READ_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
WRITE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# Linking fails with these when the previous snapshot is on another filesystem, the
# filesystem has no hard links, or the inode has as many links as it may: copy then.
_CANNOT_LINK: Final = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOENT, errno.ENOSYS}
)
_LINKABLE: Final = frozenset({"message", "object"})
# Where copies made before a folder's lock wait to be moved into place under it.
ASIDE_DIR: Final = "aside"


def message_key(name: str) -> str:
    """A Maildir message's key: its file name up to the first ``:`` (store.index_file)."""
    return name.split(":", 1)[0]


def is_sqlite(path: Path) -> bool:
    """Whether ``path`` is a SQLite database (by its header, not its name)."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError:
        return False
    try:
        return os.read(fd, len(SQLITE_MAGIC)) == SQLITE_MAGIC
    finally:
        os.close(fd)


@dataclass(slots=True)
class WriteStats:
    """What one snapshot cost: files linked to the previous one, files copied."""

    linked: int = 0
    copied: int = 0
    copied_octets: int = 0
    databases: int = 0


class PreviousSnapshot:
    """The newest complete snapshot before this one: what may be linked from it."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.files = path / FILES_DIR
        self._by_path = {entry.path: entry for entry in manifest.files if entry.kind in _LINKABLE}
        self._by_key: dict[tuple[str, str], FileEntry] = {}
        for entry in self._by_path.values():
            if entry.kind == "message":
                folder, _, name = entry.path.rpartition("/")
                self._by_key[(folder.rpartition("/")[0], message_key(name))] = entry

    def match(self, path: str, kind: FileKind, info: os.stat_result) -> FileEntry | None:
        """The previous snapshot's copy of an unchanged immutable file, if it has one."""
        if kind not in _LINKABLE:
            return None
        entry = self._by_path.get(path)
        if entry is None and kind == "message":
            folder, _, name = path.rpartition("/")
            entry = self._by_key.get((folder.rpartition("/")[0], message_key(name)))
        if entry is None or entry.size != info.st_size or entry.mtime_ns != info.st_mtime_ns:
            return None
        return entry


class SnapshotWriter:
    """Writes files into ``staging/files`` and keeps the manifest's file list."""

    def __init__(self, staging: Path, previous: PreviousSnapshot | None) -> None:
        self.staging = staging
        self.files = staging / FILES_DIR
        self.previous = previous
        self.entries: dict[str, FileEntry] = {}
        self.dirs: dict[str, None] = {}
        self.stats = WriteStats()
        self._aside = 0
        os.mkdir(self.files, DIR_MODE)
        os.mkdir(staging / ASIDE_DIR, DIR_MODE)

    def target(self, path: str) -> Path:
        return self.files / path

    def mkdir(self, path: str) -> None:
        """Make the directory ``path`` (and its parents) in the snapshot."""
        if path in self.dirs:
            return
        parent = path.rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        os.mkdir(self.target(path), DIR_MODE)
        self.dirs[path] = None

    def _ensure_parent(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent:
            self.mkdir(parent)

    def add(self, source: Path, path: str, kind: FileKind, *, follow: bool = False) -> bool:
        """Put the file at ``source`` into the snapshot as ``path``: linked if the
        previous snapshot has it unchanged, else copied. False if it is gone (or is
        not a regular file); OSError for anything else."""
        try:
            fd = os.open(source, READ_FLAGS & ~os.O_NOFOLLOW if follow else READ_FLAGS)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink inside a tree: not ours to follow
                return False
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return False
            self._ensure_parent(path)
            self.replace_if_present(path)
            if self.previous is not None:
                entry = self.previous.match(path, kind, info)
                if entry is not None and self._link(entry, path):
                    self.entries[path] = FileEntry(
                        path, entry.size, entry.sha256, entry.mtime_ns, kind
                    )
                    return True
            self.entries[path] = self._copy(fd, path, kind, info)
            return True
        finally:
            os.close(fd)

    def replace_if_present(self, path: str) -> None:
        """Drop a file written earlier as ``path`` (a second pass found it changed)."""
        if self.entries.pop(path, None) is not None:
            os.unlink(self.target(path))

    def adopt(self, staged: Path, path: str, entry: FileEntry) -> None:
        """Move a file copied earlier into the staging area (``copy_aside``) to ``path``."""
        self._ensure_parent(path)
        os.rename(staged, self.target(path))
        self.entries[path] = FileEntry(path, entry.size, entry.sha256, entry.mtime_ns, entry.kind)

    def aside_path(self) -> Path:
        """A fresh name outside ``files/`` for a ``copy_aside``."""
        self._aside += 1
        return self.staging / ASIDE_DIR / str(self._aside)

    def copy_aside(self, source: Path, staged: Path, kind: FileKind) -> FileEntry | None:
        """Copy ``source`` to ``staged`` (outside ``files/``) for a later ``adopt``;
        None if the file is gone. The entry's path is left empty."""
        try:
            fd = os.open(source, READ_FLAGS)
        except FileNotFoundError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            return self._copy_to(fd, staged, "", kind, info)
        finally:
            os.close(fd)

    def write_bytes(self, path: str, data: bytes, mtime_ns: int, kind: FileKind) -> None:
        """Put ``data`` into the snapshot as ``path`` (what was read under a lock)."""
        self._ensure_parent(path)
        self.replace_if_present(path)
        target = self.target(path)
        fd = os.open(target, WRITE_FLAGS, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.utime(target, ns=(mtime_ns, mtime_ns))
        sha256 = hashlib.sha256(data).hexdigest()
        self.entries[path] = FileEntry(path, len(data), sha256, mtime_ns, kind)
        self.stats.copied += 1
        self.stats.copied_octets += len(data)

    def add_sqlite(self, source: Path, path: str) -> bool:
        """Take the database at ``source`` through SQLite's online backup API.

        One step (``pages=-1``): the copy is the database as of one read transaction,
        whatever writers do meanwhile (in WAL mode they are not even held up), where a
        copy of the file could catch a commit half written or miss the WAL.
        False if the database is gone.
        """
        if not source.exists():
            return False
        self._ensure_parent(path)
        self.replace_if_present(path)
        target = self.target(path)
        try:
            uri = f"{source.absolute().as_uri()}?mode=rw"
            origin = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT)
            try:
                copy = sqlite3.connect(target)
                try:
                    origin.backup(copy, pages=-1)
                finally:
                    copy.close()
            finally:
                origin.close()
        except sqlite3.Error as exc:
            raise BackupError(f"{source}: SQLite backup failed: {exc}") from exc
        os.chmod(target, FILE_MODE)
        mtime_ns = os.stat(source).st_mtime_ns
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size, sha256 = file_digest(fd)
        finally:
            os.close(fd)
        os.utime(target, ns=(mtime_ns, mtime_ns))
        self.entries[path] = FileEntry(path, size, sha256, mtime_ns, "sqlite")
        self.stats.databases += 1
        return True

    def _link(self, entry: FileEntry, path: str) -> bool:
        assert self.previous is not None
        try:
            os.link(self.previous.files / entry.path, self.target(path))
        except OSError as exc:
            if exc.errno in _CANNOT_LINK:
                return False
            raise
        self.stats.linked += 1
        return True

    def _copy(self, fd: int, path: str, kind: FileKind, info: os.stat_result) -> FileEntry:
        return self._copy_to(fd, self.target(path), path, kind, info)

    def _copy_to(
        self, fd: int, target: Path, path: str, kind: FileKind, info: os.stat_result
    ) -> FileEntry:
        digest = hashlib.sha256()
        size = 0
        out = os.open(target, WRITE_FLAGS, FILE_MODE)
        try:
            while chunk := os.read(fd, READ_CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
                size += len(chunk)
        finally:
            os.close(out)
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        self.stats.copied += 1
        self.stats.copied_octets += size
        return FileEntry(path, size, digest.hexdigest(), info.st_mtime_ns, kind)
