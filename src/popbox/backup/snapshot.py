"""``popbox backup DEST``: one complete, consistent snapshot of popbox's local state.

Each run writes ``DEST/<UTC time>/`` (``20261207T235517Z``), complete on its own and
incremental against the newest earlier snapshot in DEST: unchanged message files and
archive objects are hard links to it (backup.writer), the rest is copied. A snapshot
is written as ``DEST/.partial-<time>`` and renamed only once everything is on disk
and its manifest written, so a killed backup leaves nothing that looks complete; the
next run (they take turns on ``DEST/.popbox-backup.lock``) removes what it left.

What is consistent with what, with the server running:

- each user's Maildir folders with their indexes, device states, kept UIDLs and
  lock notes, taken under all the user's folder locks at once (backup.maildirs has
  the argument);
- each SQLite database (the archive's ``index.sqlite``, the collector's state, any
  other) as of one read transaction, through SQLite's online backup API, never by
  copying its file;
- the archive's objects with its index: they are immutable and written before the
  index entry that names them, so the files of a directory tree are taken twice,
  before the databases and after: an object named by the index copy was there for
  one of the two walks (unless an entry was added and removed within the backup);
- everything else (the passwd file, app passwords, TLS files) is replaced whole by
  a rename when it changes, so the copy is one version of each.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from popbox.backup.maildirs import snapshot_mail_root
from popbox.backup.manifest import (
    MANIFEST_NAME,
    BackupError,
    FileKind,
    Manifest,
    RootEntry,
    read_manifest,
    write_manifest,
)
from popbox.backup.roots import Root, nested_in, roots_of
from popbox.backup.writer import ASIDE_DIR, PreviousSnapshot, SnapshotWriter, WriteStats, is_sqlite
from popbox.config import Config
from popbox.errors import PopboxError
from popbox.fileio import FileLock, fsync_dir

__all__ = ["PARTIAL_PREFIX", "SnapshotResult", "complete_snapshots", "take_snapshot"]

log = logging.getLogger(__name__)

# A snapshot's name: its UTC time to the second, and a counter when two share one.
STAMP_FORMAT: Final = "%Y%m%dT%H%M%SZ"
STAMP_PATTERN: Final = re.compile(r"^\d{8}T\d{6}Z(?:-\d+)?$")
# A snapshot being written; whatever has this name when no backup runs is a leftover.
PARTIAL_PREFIX: Final = ".partial-"
# Held while a backup writes into DEST, so two never share (or clean up) a snapshot.
LOCK_NAME: Final = ".popbox-backup.lock"
# The files a SQLite database keeps beside itself: the backup API reads through them.
SQLITE_SIDE_FILES: Final = ("-wal", "-shm", "-journal")
# The archive keeps its immutable, content-addressed files here (the index names them).
OBJECTS_DIR: Final = "objects"
# popbox.archive.objects writes an object under this prefix and renames it when whole:
# such a file is an object being written, which no index entry names yet.
OBJECT_TEMPORARY_PREFIX: Final = ".tmp-"

Progress = Callable[[str], None]


@dataclass(slots=True)
class SnapshotResult:
    """What ``take_snapshot`` made."""

    path: Path
    manifest: Manifest
    stats: WriteStats
    previous: Path | None
    removed_leftovers: list[str] = field(default_factory=list)


def complete_snapshots(dest: Path) -> list[Path]:
    """The complete snapshots in ``dest``, oldest first."""
    if not dest.is_dir():
        return []
    found = [
        entry
        for entry in dest.iterdir()
        if STAMP_PATTERN.match(entry.name) and (entry / MANIFEST_NAME).is_file()
    ]
    return sorted(found, key=lambda path: _stamp_order(path.name))


def _stamp_order(name: str) -> tuple[str, int]:
    stamp, _, counter = name.partition("-")
    return stamp, int(counter or 0)


def take_snapshot(config: Config, dest: Path, progress: Progress | None = None) -> SnapshotResult:
    """Write one snapshot of ``config``'s local state into ``dest``; BackupError if
    it cannot be made (another backup runs, a file cannot be read)."""
    say = progress if progress is not None else log.info
    roots, notes = roots_of(config)
    dest = dest.absolute()
    for root in roots:
        # The data directory's walk leaves DEST out; a Maildir root or the archive
        # would take it for a user's mailbox or for archive files.
        if root.kind == "dir" and root.name != "data" and dest.is_relative_to(root.path):
            raise BackupError(f"{dest} is inside {root.path} ({root.name}): back up elsewhere")
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            lock = FileLock(dest / LOCK_NAME)
        except BlockingIOError:
            raise BackupError(f"another popbox backup is writing into {dest}") from None
        with lock:
            return _take(config, dest, roots, notes, say)
    except PopboxError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise BackupError(f"backup into {dest} failed: {exc.strerror}{where}") from exc


def _take(
    config: Config, dest: Path, roots: list[Root], notes: list[str], say: Progress
) -> SnapshotResult:
    removed = _remove_leftovers(dest)
    for name in removed:
        say(f"removed {name}, left by a backup that did not finish")
    previous = _previous(dest, say)
    name = _fresh_name(dest)
    staging = dest / f"{PARTIAL_PREFIX}{name}"
    os.mkdir(staging, 0o700)
    writer = SnapshotWriter(staging, previous)
    manifest = Manifest(created=name, not_included=list(notes))

    def waiting(user: str, folder: str) -> None:
        say(f"waiting for a session of {user} to end (folder {folder})")

    for root in roots:
        if not root.path.exists():
            continue
        manifest.roots.append(RootEntry(root.name, root.kind, str(root.path)))
        if root.kind == "file":
            if not writer.add(root.path, root.name, "file", follow=True):
                manifest.roots.pop()
            continue
        skip = nested_in(root, roots) | {dest}
        tree = _TreeWalk(writer, root, skip)
        if root.name == "mail":
            manifest.mailboxes = snapshot_mail_root(
                writer, root.path, root.name, tree.copy, waiting
            )
        else:
            tree.copy(root.path, root.name)
            tree.take_databases()
            tree.copy(root.path, root.name)  # what came in meanwhile (module docstring)
            tree.take_databases()
    manifest.users = _users(config)
    manifest.files = sorted(writer.entries.values(), key=lambda entry: entry.path)
    manifest.dirs = list(writer.dirs)
    os.rmdir(staging / ASIDE_DIR)
    # Everything written so far reaches the disk before the manifest says the
    # snapshot is whole: one flush of all of it, where an fsync per file would be
    # a disk flush per message (the manifest and the renames get their own).
    os.sync()
    write_manifest(staging, manifest)
    fsync_dir(staging)
    final = dest / name
    os.rename(staging, final)
    fsync_dir(dest)
    for note in notes:
        say(f"not included: {note}")
    return SnapshotResult(
        final, manifest, writer.stats, previous.path if previous else None, removed
    )


class _TreeWalk:
    """Copies a directory tree into the snapshot: SQLite databases aside for the online
    backup, archive objects as immutable files, symlinks and special files left out."""

    def __init__(self, writer: SnapshotWriter, root: Root, skip: set[Path]) -> None:
        self._writer = writer
        self._root = root
        self._skip = skip
        self._databases: dict[Path, str] = {}
        self._taken: set[Path] = set()

    def copy(self, directory: Path, path: str) -> None:
        """Copy ``directory`` as ``path``; a second call adds what is new or changed."""
        self._writer.mkdir(path)
        try:
            entries = sorted(os.scandir(directory), key=lambda item: item.name)
        except FileNotFoundError:
            return
        names = {entry.name for entry in entries}
        for entry in entries:
            source = Path(entry.path)
            if source in self._skip:
                continue
            target = f"{path}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                self.copy(source, target)
            elif entry.is_file(follow_symlinks=False):
                self._copy_file(source, target, entry, names)
            else:
                log.warning("backup: %s left out: not a regular file or directory", source)

    def _copy_file(
        self, source: Path, target: str, entry: os.DirEntry[str], names: set[str]
    ) -> None:
        if source in self._databases:
            return
        for suffix in SQLITE_SIDE_FILES:
            if entry.name.endswith(suffix) and entry.name.removesuffix(suffix) in names:
                return  # read through the database's own connection
        known = self._writer.entries.get(target)
        if known is not None:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                return  # gone since the first walk, which has it
            if known.size == info.st_size and known.mtime_ns == info.st_mtime_ns:
                return  # the second walk: unchanged since the first
        kind = self._kind(source)
        if kind == "object" and entry.name.startswith(OBJECT_TEMPORARY_PREFIX):
            return
        if kind != "object" and is_sqlite(source):  # objects are messages, never databases
            self._databases[source] = target
            return
        self._writer.add(source, target, kind)

    def _kind(self, source: Path) -> FileKind:
        if self._root.name == "archive" and source.is_relative_to(self._root.path / OBJECTS_DIR):
            return "object"
        return "file"

    def take_databases(self) -> None:
        """Back up the databases found since the last call."""
        for source, target in self._databases.items():
            if source not in self._taken:
                self._writer.add_sqlite(source, target)
                self._taken.add(source)


def _remove_leftovers(dest: Path) -> list[str]:
    removed = []
    for entry in dest.iterdir():
        if entry.name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(entry)
            removed.append(entry.name)
    return removed


def _previous(dest: Path, say: Progress) -> PreviousSnapshot | None:
    for path in reversed(complete_snapshots(dest)):
        try:
            return PreviousSnapshot(path, read_manifest(path))
        except BackupError as exc:
            say(f"not linking against {path.name}: {exc}")
    return None


def _fresh_name(dest: Path) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime(STAMP_FORMAT)
    name, counter = stamp, 0
    while (dest / name).exists() or (dest / f"{PARTIAL_PREFIX}{name}").exists():
        counter += 1
        name = f"{stamp}-{counter}"
    return name


def _users(config: Config) -> list[str]:
    if config.auth.backend != "passwd-file":
        return []
    from popbox.auth.admin import list_users

    return [record.name for record in list_users(config.auth.passwd_file)]
