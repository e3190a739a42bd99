"""The Maildirs of a snapshot: each user's folders taken whole, under all their locks.

Why a folder's snapshot is consistent while ``popbox serve`` runs. A folder is its
message files (cur/, new/) and four files popbox keeps beside them: the index
(``popbox-index``: UIDs, UIDVALIDITY, ``next``), the device state
(``popbox.devices``), the kept UIDLs (``popbox.uidls``) and the UIDVALIDITY note in
``popbox.lock``. Who changes them:

- A POP3 session, a sweep, ``popbox device forget`` and ``popbox import`` change the
  index, the state, the UIDL list and the files only while they hold the folder's
  ``flock`` on ``popbox.lock`` (store.maildrop, store.maildir_upkeep). The snapshot
  takes the same lock, so none of them runs while it reads: the index, the state,
  the note and the files of cur/ and new/ are what the last of them left, and agree.
  A session that holds the lock is waited for: it ends at its QUIT (its deletions
  then are in the snapshot, whole) or at its idle timeout (it deleted nothing).
- A commit or a sweep that moves mail to Trash or Archive holds only the lock of
  the folder it moves from, and puts the message into the other folder as a
  delivery would. Taken one folder after the other, a message could be caught in
  INBOX and then again in Trash; so a user's folders are all locked together, in
  one order, before any of them is read, and no move can happen in between.
- A delivery never takes that lock. It only adds: its line to ``popbox.uidls``
  (appended under that file's own ``flock``, fsynced) and then its file into new/.
  The listing of new/ is read before ``popbox.uidls``, so every message the
  snapshot holds has its kept UIDL in it; a line whose message came after the
  listing is harmless (store.maildir_uidls says so for a crash). A message in new/
  that the index does not list yet is an ordinary Maildir state: the first login
  on the restored server gives it its UID from ``next``, as the next login on
  the running server would have.
- Nothing rewrites a message file in place (Maildir renames to change flags), so a
  file copied *before* taking the lock is the same file under the lock if its name
  key, size and modification time are the same. Each folder is copied that way
  first, without the lock, and then only what changed meanwhile is copied under
  it, so the lock is held for a listing, a handful of small files, hard links and
  renames, not for copying the mailbox.

A folder's tmp/ holds deliveries under way: it is left out (made empty), as are the
``*.tmp`` files popbox renames over its index, state and UIDL list.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.backup.manifest import FileEntry, FileKind, FolderSummary
from popbox.backup.writer import SnapshotWriter, message_key
from popbox.fileio import FileLock
from popbox.store.index_file import INDEX_NAME, INDEX_TMP_NAME
from popbox.store.maildir_folders import FOLDER_MARKER
from popbox.store.maildir_state import STATE_NAME, STATE_TMP_NAME
from popbox.store.maildir_uidls import UIDLS_NAME, UIDLS_TMP_NAME
from popbox.store.maildrop import LOCK_NAME, MAX_LOCK_NOTE

__all__ = ["MESSAGE_DIRS", "TreeCopier", "snapshot_mail_root"]

# The subdirectories of a Maildir that hold messages; tmp/ holds deliveries under way.
MESSAGE_DIRS: Final = ("cur", "new")
MAILDIR_DIRS: Final = ("cur", "new", "tmp")
# Files popbox writes beside the real one and renames over it: half-written by nature.
SKIPPED_FILES: Final = frozenset({INDEX_TMP_NAME, STATE_TMP_NAME, UIDLS_TMP_NAME})
# The files that only mean something together with the messages they describe.
FOLDER_FILES: Final = frozenset({INDEX_NAME, STATE_NAME, FOLDER_MARKER})

TreeCopier = Callable[[Path, str], None]
"""(directory, snapshot path): copy a directory that is not a Maildir, as it is."""
Waiting = Callable[[str, str], None]
"""(user, folder): told when a folder's lock is held by a session the snapshot waits for."""


def snapshot_mail_root(
    writer: SnapshotWriter, root: Path, name: str, copy_tree: TreeCopier, waiting: Waiting
) -> dict[str, dict[str, FolderSummary]]:
    """Take every user's Maildir under ``root`` into the snapshot as ``name/USER``;
    user -> folder -> what the snapshot holds of it."""
    writer.mkdir(name)
    mailboxes: dict[str, dict[str, FolderSummary]] = {}
    for entry in sorted(os.scandir(root), key=lambda item: item.name):
        path = f"{name}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            if _is_maildir(Path(entry.path)):
                mailboxes[entry.name] = _snapshot_user(
                    writer, Path(entry.path), path, entry.name, copy_tree, waiting
                )
            else:
                copy_tree(Path(entry.path), path)
        elif entry.is_file(follow_symlinks=False):
            writer.add(Path(entry.path), path, "file")
    return mailboxes


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() or (path / "new").is_dir()


@dataclass(frozen=True, slots=True)
class _Folder:
    name: str
    maildir: Path
    path: str
    """Where it goes in the snapshot."""


def _snapshot_user(
    writer: SnapshotWriter,
    maildir: Path,
    path: str,
    user: str,
    copy_tree: TreeCopier,
    waiting: Waiting,
) -> dict[str, FolderSummary]:
    """INBOX (the user's Maildir) and each Maildir++ folder ``.NAME`` inside it, all
    under their locks at once (the module docstring says why)."""
    folders = [_Folder("INBOX", maildir, path)]
    for entry in sorted(os.scandir(maildir), key=lambda item: item.name):
        if not entry.is_dir(follow_symlinks=False) or entry.name in MAILDIR_DIRS:
            continue
        inner = Path(entry.path)
        if entry.name.startswith(".") and _is_maildir(inner):
            folders.append(_Folder(entry.name[1:], inner, f"{path}/{entry.name}"))
        else:
            copy_tree(inner, f"{path}/{entry.name}")
    aside = {folder.name: _copy_aside(writer, folder.maildir, folder.path) for folder in folders}
    summaries: dict[str, FolderSummary] = {}
    with contextlib.ExitStack() as stack:
        # Always in this order, each waited for while holding the ones before: a
        # session holds one lock and never waits for another, so this cannot deadlock.
        locks = [
            stack.enter_context(_lock(folder.maildir, (user, folder.name), waiting))
            for folder in folders
        ]
        for folder, lock in zip(folders, locks, strict=True):
            summaries[folder.name] = _snapshot_folder(
                writer, folder.maildir, folder.path, lock, aside[folder.name]
            )
    for staged in aside.values():
        for leftover, _ in staged.values():
            os.unlink(leftover)  # removed by a QUIT before the lock: not in the snapshot
    return summaries


def _message_files(maildir: Path) -> list[tuple[str, os.DirEntry[str], os.stat_result]]:
    """(subdirectory, entry, stat) of every regular file in cur/ and new/; a file
    renamed or removed since the listing (a login, a QUIT) is left out."""
    found: list[tuple[str, os.DirEntry[str], os.stat_result]] = []
    for sub in MESSAGE_DIRS:
        try:
            entries = list(os.scandir(maildir / sub))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    found.append((sub, entry, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return found


def _copy_aside(
    writer: SnapshotWriter, maildir: Path, path: str
) -> dict[str, tuple[Path, FileEntry]]:
    """Copy, without the lock, the messages the previous snapshot cannot give: by key."""
    aside: dict[str, tuple[Path, FileEntry]] = {}
    for sub, entry, info in _message_files(maildir):
        previous = writer.previous
        if previous is not None and previous.match(f"{path}/{sub}/{entry.name}", "message", info):
            continue  # linked under the lock, which costs nothing
        staged = writer.aside_path()
        copied = writer.copy_aside(Path(entry.path), staged, "message")
        if copied is not None:
            aside[message_key(entry.name)] = (staged, copied)
    return aside


def _lock(maildir: Path, place: tuple[str, str], waiting: Waiting) -> FileLock:
    try:
        return FileLock(maildir / LOCK_NAME)
    except BlockingIOError:
        waiting(*place)
        return FileLock(maildir / LOCK_NAME, wait=True)


def _snapshot_folder(
    writer: SnapshotWriter,
    maildir: Path,
    path: str,
    lock: FileLock,
    aside: dict[str, tuple[Path, FileEntry]],
) -> FolderSummary:
    """One folder, its ``lock`` held; takes from ``aside`` the copies it uses."""
    summary = FolderSummary()
    writer.mkdir(path)
    for sub in MAILDIR_DIRS:
        writer.mkdir(f"{path}/{sub}")
    # The note first: it is only ever written under this lock, which we hold.
    note = os.pread(lock.fd, MAX_LOCK_NOTE, 0)
    lock_info = os.fstat(lock.fd)
    writer.write_bytes(f"{path}/{LOCK_NAME}", note, lock_info.st_mtime_ns, "maildir-meta")
    for entry in sorted(os.scandir(maildir), key=lambda item: item.name):
        if (
            entry.name in SKIPPED_FILES
            or entry.name in (LOCK_NAME, UIDLS_NAME)
            or not entry.is_file(follow_symlinks=False)
        ):
            continue
        kind: FileKind = "maildir-meta" if entry.name in FOLDER_FILES else "file"
        writer.add(Path(entry.path), f"{path}/{entry.name}", kind)
    # The listing before the UIDL list: see the module docstring.
    for sub, entry, info in _message_files(maildir):
        target = f"{path}/{sub}/{entry.name}"
        key = message_key(entry.name)
        staged = aside.get(key)
        if (
            staged is not None
            and staged[1].size == info.st_size
            and staged[1].mtime_ns == info.st_mtime_ns
        ):
            writer.adopt(staged[0], target, staged[1])
            del aside[key]
        elif not writer.add(Path(entry.path), target, "message"):
            continue  # renamed by a mail client meanwhile: not ours to chase
        summary.messages += 1
        summary.octets += info.st_size
    _add_uidls(writer, maildir, path)
    return summary


def _add_uidls(writer: SnapshotWriter, maildir: Path, path: str) -> None:
    """The kept UIDLs, read under the file's own lock so no append is caught half done."""
    try:
        fd = os.open(maildir / UIDLS_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return
        chunks = []
        while chunk := os.read(fd, 1024 * 1024):
            chunks.append(chunk)
    finally:
        os.close(fd)
    writer.write_bytes(f"{path}/{UIDLS_NAME}", b"".join(chunks), info.st_mtime_ns, "maildir-meta")
