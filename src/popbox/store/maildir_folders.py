"""Where a user's folders live under the Maildir root, and opening one under its lock.

INBOX is the user's Maildir, ``root/USER`` unless a ``MailLocation`` (store.location)
puts it elsewhere; every other folder is a Maildir++ folder
inside it, ``root/USER/.NAME`` (``.lists.python`` for the nested ``lists.python``),
with its own cur/, new/ and tmp/ and an empty ``maildirfolder`` file, as Dovecot and
Courier make and read them. Each folder is a Maildir of its own for popbox too: its
own lock, index and device state (store.maildir_state). Folder names are checked by
store.mailbox.check_folder_name, so no name reaches outside the user's Maildir.

``Mailboxes`` keeps what a worker process knows about the users' Maildirs
(joined paths, which Maildirs are complete, when tmp/ was last swept) and brings a
locked folder's index and state up to date, for a login and for upkeep alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from popbox.errors import InvalidMailboxName, PermanentStoreError
from popbox.fileio import FileLock, fsync_dir
from popbox.store.index import CorruptIndex, MaildirIndex
from popbox.store.index_cache import IndexCache, LoadedIndex
from popbox.store.index_file import (
    INDEX_NAME,
    index_signature,
    read_index,
    signature_of,
    write_index,
)
from popbox.store.location import MailLocation, UnderRoot
from popbox.store.mailbox import INBOX, check_folder_name, is_inbox
from popbox.store.maildir_state import STATE_NAME, read_state
from popbox.store.maildir_sync import reconcile
from popbox.store.maildir_uidls import apply_uidls
from popbox.store.maildrop import (
    LOCK_NAME,
    FolderPlace,
    record_uidvalidity,
    recorded_uidvalidity,
)

__all__ = ["FOLDER_MARKER", "FolderLayout", "Mailboxes", "check_user"]

log = logging.getLogger(__name__)

# The empty file that marks a Maildir++ folder (Courier's and Dovecot's convention).
FOLDER_MARKER: Final = "maildirfolder"
# qmail's rule (maildir(5)): a tmp/ file untouched for 36 hours is a dead delivery.
TMP_MAX_AGE: Final = 36 * 3600
# Maildirs this process made or found complete, remembered so that a login skips the
# five mkdir() attempts; past this many the memory is simply started afresh (a forgotten
# Maildir only costs its next login the attempts again).
MAX_KNOWN_MAILDIRS: Final = 100_000
# NAME_MAX on Linux filesystems; a longer user name cannot be a directory anyway.
MAX_USER_LENGTH: Final = 255
# Maildir directories are private to the mail owner (Dovecot, Postfix).
DIR_MODE: Final = 0o700
# Marker files are private too, and empty.
FILE_MODE: Final = 0o600
# How many folders' joined paths a process keeps (see Mailboxes.layout).
MAX_LAYOUTS: Final = 256


def check_user(user: str) -> None:
    """Refuse a user name that could name anything but a directory directly in root."""
    if (
        not user
        or len(user.encode("utf-8", "surrogateescape")) > MAX_USER_LENGTH
        or user in (".", "..")
        or user.startswith(".")
        or "/" in user
        or "\\" in user
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in user)
    ):
        raise PermanentStoreError(f"invalid user name {user!r}")


class FolderLayout:
    """The paths of one folder's Maildir, joined once per process rather than per login.

    pathlib joins are not free at every login, and a Path made once keeps its
    string and hash, so the stats and set lookups of every later login are cheaper.
    """

    __slots__ = ("base", "cur", "index", "lock", "maildir", "new", "place", "state")

    def __init__(self, user: str, folder: str, maildir: Path, base: Path) -> None:
        key = user if folder == INBOX else f"{user}/.{folder}"
        self.place = FolderPlace(user, folder, maildir, key)
        self.maildir = maildir
        self.base = base
        """The user's Maildir (INBOX), which holds this folder."""
        self.lock = maildir / LOCK_NAME
        self.index = maildir / INDEX_NAME
        self.state = maildir / STATE_NAME
        self.cur = maildir / "cur"
        self.new = maildir / "new"


class Mailboxes:
    """The users' Maildirs under ``root``, as one worker process knows them.

    Sets and dicts here are safe across the worker threads for single operations.
    """

    def __init__(
        self,
        root: Path,
        cache: IndexCache,
        tmp_sweep_interval: float,
        location: MailLocation | None = None,
    ) -> None:
        """``location``: where each user's Maildir is (``root/USER`` if not given)."""
        self.root = root
        self.location: MailLocation = location if location is not None else UnderRoot(root)
        self._cache = cache
        # Maildirs known to have cur/, new/ and tmp/ (a login that finds one missing
        # after all makes it again), and when this process last swept each tmp/.
        self._known: set[Path] = set()
        self._tmp_swept: dict[Path, float] = {}
        self._tmp_sweep_interval = tmp_sweep_interval
        # Paths by folder (checked names only), for the folders that are opened often:
        # a layout is ~1.5 KB of Path objects, so a server with many users keeps only
        # the last MAX_LAYOUTS' worth rather than one per folder it has seen.
        self._layouts: dict[tuple[str, str], FolderLayout] = {}

    def layout(self, user: str, folder: str = INBOX) -> FolderLayout:
        """The paths of a folder; PermanentStoreError (InvalidMailboxName) for a name
        that could reach outside the user's Maildir."""
        layout = self._layouts.get((user, folder))
        if layout is None:
            check_user(user)
        base = self.location.maildir(user)
        # The location may move (a changed home or mail field); while it has not, it
        # is the same Path object, so a known layout costs an identity check.
        if layout is not None and (base is layout.base or base == layout.base):
            return layout
        name = check_folder_name(folder)
        maildir = base if name == INBOX else base / f".{name}"
        if len(self._layouts) >= MAX_LAYOUTS:
            self._layouts.clear()  # forgetting only costs the joins again
        layout = self._layouts[(user, folder)] = FolderLayout(user, name, maildir, base)
        return layout

    def layouts_kept(self) -> int:
        return len(self._layouts)

    def is_known(self, maildir: Path) -> bool:
        return maildir in self._known

    def forget(self, maildir: Path) -> None:
        self._known.discard(maildir)

    # -- making folders -------------------------------------------------------------

    def ensure_maildir(self, maildir: Path) -> None:
        """Make cur/, new/ and tmp/ of ``maildir`` if missing, durably; for a folder
        (``.NAME`` in a user's Maildir) the user's Maildir first and the marker file."""
        folder = maildir.name.startswith(".")
        if folder and maildir.parent not in self._known:
            self.ensure_maildir(maildir.parent)
        created = False
        if not folder:
            created = _make_parents(maildir.parent)
        try:
            maildir.mkdir(mode=DIR_MODE)
            created = True
        except FileExistsError:
            pass
        if folder and not stat.S_ISDIR(os.lstat(maildir).st_mode):
            # A symlink (or a file) in its place would take mail out of the user's Maildir.
            raise PermanentStoreError(f"{maildir.name} is not a folder of {maildir.parent.name}")
        if folder:
            # Before cur/: a folder is listed once it has cur/, and has its marker then.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            with contextlib.suppress(FileExistsError):
                os.close(os.open(maildir / FOLDER_MARKER, flags, FILE_MODE))
                created = True
        for sub in ("cur", "new", "tmp"):
            try:
                (maildir / sub).mkdir(mode=DIR_MODE)
                created = True
            except FileExistsError:
                pass
        if created:
            # A delivery into a brand-new Maildir is only durable with its directories.
            fsync_dir(maildir.parent)
            fsync_dir(maildir)
        if len(self._known) >= MAX_KNOWN_MAILDIRS:
            self._known.clear()  # forgetting only costs the mkdir() attempts
        self._known.add(maildir)

    def folder_maildir(self, user: str, folder: str) -> Path:
        """The Maildir of ``folder``, made (durably) if missing."""
        maildir = self.layout(user, folder).maildir
        if maildir not in self._known:
            self.ensure_maildir(maildir)
        return maildir

    def exists(self, layout: FolderLayout) -> bool:
        """Whether the folder's Maildir is there, a directory (not a symlink) with cur/."""
        try:
            if layout.place.folder != INBOX and not stat.S_ISDIR(os.lstat(layout.maildir).st_mode):
                return False
            return stat.S_ISDIR(os.stat(layout.cur).st_mode)
        except FileNotFoundError:
            return False

    def folder_names(self, user: str) -> list[str]:
        """INBOX, then the user's other folders by name: the ``.NAME`` directories of
        the user's Maildir that hold cur/ (symlinks and other names ignored)."""
        names: list[str] = []
        try:
            with os.scandir(self.layout(user).maildir) as entries:
                for entry in entries:
                    name = entry.name[1:]
                    if not entry.name.startswith(".") or is_inbox(name):
                        continue
                    try:
                        check_folder_name(name)
                    except InvalidMailboxName:
                        continue
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    if os.path.isdir(os.path.join(entry.path, "cur")):
                        names.append(name)
        except FileNotFoundError:
            pass
        return [INBOX, *sorted(names)]

    # -- a locked folder ------------------------------------------------------------

    def current_index(self, layout: FolderLayout) -> LoadedIndex | None:
        """The cached index, taken out, if the file is still the one it was read from
        or wrote; the session owns (and may change) it until it hands it back."""
        loaded = self._cache.take(layout.place.key)
        if loaded is None or loaded.signature != signature_of(layout.index):
            return None
        return loaded

    def sync_index(
        self, layout: FolderLayout, lock: FileLock, order: Sequence[str] = ()
    ) -> LoadedIndex:
        """Bring the index in line with cur/ and new/; called with the lock held.

        ``order``: message keys whose messages, if new to the index, get their UIDs
        first and in this order (store.maildir_sync.reconcile)."""
        maildir = layout.maildir
        user = layout.place.key
        loaded = self.current_index(layout)
        if loaded is not None:
            index, changed = loaded.index, False
        else:
            index, changed = _load_or_rebuild(user, maildir, lock)
        self.sweep_tmp(maildir)
        changed |= reconcile(user, maildir, index, order)
        if loaded is None or changed:
            # Kept UIDLs matter only to messages new to this index version: an index
            # taken from the cache unchanged has them already.
            apply_uidls(user, maildir, index)
        if changed:
            columns = index.columns()
            synced = LoadedIndex(index, write_index(maildir, index, columns), columns)
            if loaded is not None:
                synced.state = loaded.state
            return synced
        if loaded is None:
            return LoadedIndex(index, index_signature(maildir))
        return loaded

    def load_state(self, layout: FolderLayout, loaded: LoadedIndex) -> bool:
        """Make ``loaded.state`` the folder's state as its file holds it; True if it
        must be written (its UIDs were void: the index was rebuilt). Raises
        StateFormatError for a damaged or newer file."""
        cached = loaded.state
        if cached is None or cached.signature != signature_of(layout.state):
            cached = loaded.state = read_state(layout.maildir, loaded.index.uidvalidity)
        state = cached.state
        if state.uidvalidity != loaded.index.uidvalidity:
            log.warning(
                "folder %s: the index was rebuilt; devices see every message again",
                layout.place.key,
            )
            state.rebase(loaded.index.uidvalidity)
            return True
        return False

    # -- tmp/ -------------------------------------------------------------------------

    def tmp_sweep_due(self, maildir: Path) -> bool:
        last = self._tmp_swept.get(maildir)
        return last is None or time.monotonic() - last >= self._tmp_sweep_interval

    def sweep_tmp(self, maildir: Path) -> None:
        """Remove dead deliveries from tmp/, at most once per interval per process."""
        if not self.tmp_sweep_due(maildir):
            return
        now = time.monotonic()
        _remove_stale_tmp(maildir / "tmp")
        if len(self._tmp_swept) >= MAX_KNOWN_MAILDIRS:
            self._tmp_swept.clear()  # forgetting only costs a sweep
        self._tmp_swept[maildir] = now


def _load_or_rebuild(user: str, maildir: Path, lock: FileLock) -> tuple[MaildirIndex, bool]:
    """The index, or a fresh one (and True: it must be written) if missing or damaged.

    A fresh index gets a UIDVALIDITY above every one this Maildir had (from the old
    header or the lock file), so its UIDLs cannot repeat an old one.
    """
    floor = 0
    try:
        index = read_index(maildir)
    except CorruptIndex as exc:
        log.warning("maildrop of %s: index damaged (%s); rebuilding, UIDLs change", user, exc)
        floor = exc.uidvalidity or 0
    else:
        if index is not None:
            if index.outdated_format:
                # Same UIDs, UIDVALIDITY and next, in the current format: no UIDL moves.
                log.info("maildrop of %s: index converted to the current format", user)
            return index, index.outdated_format
    floor = max(floor, recorded_uidvalidity(lock))
    uidvalidity = max(int(time.time()), floor + 1)
    record_uidvalidity(lock, uidvalidity)
    return MaildirIndex(uidvalidity=uidvalidity), True


def _make_parents(directory: Path) -> bool:
    """Make ``directory`` and its missing parents, each private (``mkdir -p -m 700``):
    a location such as ``/var/vmail/%d/%n/Maildir`` needs the domain's directory."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        fsync_dir(path.parent)
    return bool(missing)


def _remove_stale_tmp(tmp: Path) -> None:
    cutoff = time.time() - TMP_MAX_AGE
    with os.scandir(tmp) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
