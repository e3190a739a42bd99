"""The Maildir mail store: each user's mail in ``root/USER/{cur,new,tmp}``.

Interchangeable with Postfix, Dovecot, getmail and mutt: any Maildir name in new/ or
cur/ is a message, with or without ``,S=``/``,W=`` sizes and ``:2,FLAGS`` info. A
session's login takes a ``flock`` on ``popbox.lock`` (the kernel drops it when the
process dies), reconciles the directory with the index (store.index), assigns UIDLs
to messages it has not seen, and moves new/ mail to cur/ as every Maildir reader
does. Delivery never takes that lock: tmp/ -> fsync -> link into new/ -> fsync.
Delivered mail is stored with CRLF line ends unless ``save_crlf`` is off, so that RETR
can send the file as it is (``open_wire_ready``); LF-stored mail is served as well.

Sizes are indexed once: from W= in the name (Dovecot's "virtual size", not opened),
else by reading the file. W= leaves out the CRLF that RETR adds after a last line
without one, so popbox writes W= only for messages that end with a line end; a
foreign unterminated message with W= is listed 2 octets short, as Dovecot lists it.

If the index is lost or damaged it is rebuilt from the files: no message is lost,
but the rebuilt index has a new UIDVALIDITY, so every UIDL changes once and clients
that keep mail on the server download it again (the safe direction: a changed UIDL
costs a duplicate, a reused one would cost a lost message). An index in the format of
an earlier popbox is converted at the next login with every UIDL kept; an earlier
popbox that meets a newer index rebuilds it, so a downgrade changes every UIDL once.

This module is the store's front (opening maildrops, usage, tmp/ sweeping); the
session's maildrop and its lock are in store.maildrop, the indexes kept between
sessions in store.index_cache, delivery in store.maildir_deliver, reconciling the
index with the directories in store.maildir_sync, the index itself in store.index
and store.index_file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO, Final

from popbox.errors import PermanentStoreError
from popbox.fileio import FileLock, fsync_dir
from popbox.store.base import Usage
from popbox.store.index import CorruptIndex, MaildirIndex, scan_messages
from popbox.store.index_cache import IndexCache, LoadedIndex
from popbox.store.index_file import (
    INDEX_NAME,
    index_signature,
    read_header,
    read_index,
    signature_of,
    write_index,
)
from popbox.store.maildir_deliver import MaildirDelivery
from popbox.store.maildir_errors import os_errors
from popbox.store.maildir_sync import (
    count_usage,
    estimate_size,
    header_is_current,
    nothing_to_reconcile,
    reconcile,
)
from popbox.store.maildrop import (
    CHUNK_SIZE,
    LOCK_NAME,
    MaildirMaildrop,
    record_uidvalidity,
    recorded_uidvalidity,
)

__all__ = ["MaildirStore"]

log = logging.getLogger(__name__)

# qmail's rule (maildir(5)): a tmp/ file untouched for 36 hours is a dead delivery.
TMP_MAX_AGE: Final = 36 * 3600
# How often one worker process sweeps a maildrop's tmp/ at login. Against a 36-hour
# age limit an hour's delay changes nothing, and it takes a directory listing off
# almost every login (docs/performance.md).
TMP_SWEEP_INTERVAL: Final = 3600.0
# Maildirs this process made or found complete, remembered so that a login skips the
# five mkdir() attempts; past this many the memory is simply started afresh (a forgotten
# Maildir only costs its next login the attempts again).
MAX_KNOWN_MAILDIRS: Final = 100_000
# A login opens a maildrop on the event loop, without a worker thread, only when its
# cached index is current and holds at most this many messages (a snapshot not made
# yet is per-message work), and new/ is a directory this small (an empty ext4
# directory that once held 100,000 names is 8 MB to read).
INLINE_OPEN_MAX_MESSAGES: Final = 10_000
INLINE_OPEN_MAX_NEW_BYTES: Final = 16 * 1024
# NAME_MAX on Linux filesystems; a longer user name cannot be a directory anyway.
MAX_USER_LENGTH: Final = 255
# Maildir directories are private to the mail owner (Dovecot, Postfix).
DIR_MODE: Final = 0o700
# How many users' joined paths a store keeps (see MaildirStore._layouts).
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


class _Layout:
    """The paths of one user's Maildir, joined once per process rather than per login.

    pathlib joins are not free at every login, and a Path made once keeps its
    string and hash, so the stats and set lookups of every later login are cheaper.
    """

    __slots__ = ("cur", "index", "lock", "maildir", "new")

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.lock = maildir / LOCK_NAME
        self.index = maildir / INDEX_NAME
        self.cur = maildir / "cur"
        self.new = maildir / "new"


class MaildirStore:
    """Maildirs under ``root``: ``root/USER`` holds one user's cur/, new/ and tmp/."""

    def __init__(
        self,
        root: Path,
        *,
        tmp_sweep_interval: float = TMP_SWEEP_INTERVAL,
        save_crlf: bool = False,
        index_cache: IndexCache | None = None,
    ) -> None:
        """``save_crlf``: store delivered mail with CRLF line ends (``storage.save_crlf``,
        on by default in the config; off here, so a store made in code keeps bytes).
        ``index_cache``: where parsed indexes wait between sessions (one of its own if
        not given)."""
        self._root = Path(root)
        self._delivery = MaildirDelivery(save_crlf=save_crlf, make_maildir=self._ensure_maildir)
        # Parsed indexes of maildrops no session holds; each maildrop opened is given
        # the cache and hands its index back to it when its session ends.
        self._index_cache = index_cache if index_cache is not None else IndexCache()
        # Maildirs known to have cur/, new/ and tmp/ (a login that finds one missing
        # after all makes it again), and when this process last swept each tmp/.
        # Sets and dicts are safe across the worker threads for single operations.
        self._known_maildirs: set[Path] = set()
        self._tmp_swept: dict[Path, float] = {}
        self._tmp_sweep_interval = tmp_sweep_interval
        # Paths by user (checked names only), for the users that log in often: a
        # layout is ~1.5 KB of Path objects, so a server with many users keeps only
        # the last MAX_LAYOUTS' worth rather than one per user it has seen.
        self._layouts: dict[str, _Layout] = {}

    @property
    def root(self) -> Path:
        return self._root

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user``; raises PermanentStoreError for a path trick."""
        return self._layout(user).maildir

    def _layout(self, user: str) -> _Layout:
        layout = self._layouts.get(user)
        if layout is None:
            check_user(user)
            if len(self._layouts) >= MAX_LAYOUTS:
                self._layouts.clear()  # forgetting only costs the joins again
            layout = self._layouts[user] = _Layout(self._root / user)
        return layout

    # -- sessions ---------------------------------------------------------------

    async def open_maildrop(self, user: str) -> MaildirMaildrop:
        layout = self._layout(user)
        unchanged = self._open_unchanged(user, layout)
        if unchanged is not None:
            return unchanged
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_sync, user, layout))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread goes on and may take the lock; whoever cancelled us will never
            # see the maildrop, so give the lock back as soon as the thread is done.
            opening.add_done_callback(_release_abandoned)
            raise

    def _open_unchanged(self, user: str, layout: _Layout) -> MaildirMaildrop | None:
        """Open on the event loop a small maildrop whose cached index is current.

        A poll that finds nothing new costs the store a handful of syscalls on
        inodes this process touched lately (lock, index stat, cur/ stat, new/
        listing), less than the hop to a worker thread and back, which was most of
        the store's share of a login (docs/performance.md). Anything else, a big,
        changed, locked or unknown maildrop, gives up (None) before it could block
        for long, and the worker thread does the whole open as before.
        """
        maildir = layout.maildir
        loaded = self._index_cache.peek(user)
        if (
            loaded is None
            or len(loaded.index) > INLINE_OPEN_MAX_MESSAGES
            or loaded.index.written_in_new
            or not loaded.index.cur_mtime
            or maildir not in self._known_maildirs
            or self._tmp_sweep_due(maildir)
        ):
            return None
        try:
            lock = FileLock(layout.lock)
        except OSError:
            return None  # in use, or gone: the worker thread reports it
        try:
            current = self._current_index(user, layout)
            if current is None:
                lock.close()
                return None
            if nothing_to_reconcile(
                maildir, current.index, INLINE_OPEN_MAX_NEW_BYTES, cur=layout.cur, new=layout.new
            ):
                return MaildirMaildrop(user, maildir, lock, current, self._index_cache)
            self._index_cache.keep(user, current)  # the worker thread takes it from here
        except OSError:
            pass  # the worker thread tries again and reports what it finds
        except BaseException:
            lock.close()
            raise
        lock.close()
        return None

    def _open_sync(self, user: str, layout: _Layout) -> MaildirMaildrop:
        maildir = layout.maildir
        with os_errors(f"open maildrop of {user}"):
            known = maildir in self._known_maildirs
            try:
                return self._open_locked(user, layout)
            except FileNotFoundError:
                if not known:
                    raise
                # Removed (whole or in part) since this process last saw it: make it
                # again and start over. Nothing was written: every missing directory
                # is noticed before the index changes, and the cached index that may
                # have been touched was taken out of the cache, so it is read afresh.
                self._known_maildirs.discard(maildir)
                return self._open_locked(user, layout)

    def _open_locked(self, user: str, layout: _Layout) -> MaildirMaildrop:
        maildir = layout.maildir
        if maildir not in self._known_maildirs:
            self._ensure_maildir(maildir)
        lock = FileLock(layout.lock)
        try:
            loaded = self._sync_index(user, layout, lock)
            return MaildirMaildrop(user, maildir, lock, loaded, self._index_cache)
        except BaseException:
            lock.close()
            raise

    def _current_index(self, user: str, layout: _Layout) -> LoadedIndex | None:
        """The cached index, taken out, if the file is still the one it was read from
        or wrote; the session owns (and may change) it until it hands it back."""
        loaded = self._index_cache.take(user)
        if loaded is None or loaded.signature != signature_of(layout.index):
            return None
        return loaded

    def _sync_index(self, user: str, layout: _Layout, lock: FileLock) -> LoadedIndex:
        """Bring the index in line with cur/ and new/; called with the lock held."""
        maildir = layout.maildir
        loaded = self._current_index(user, layout)
        if loaded is not None:
            index, changed = loaded.index, False
        else:
            index, changed = _load_or_rebuild(user, maildir, lock)
        self._sweep_tmp(maildir)
        changed |= reconcile(user, maildir, index)
        if changed:
            columns = index.columns()
            return LoadedIndex(index, write_index(maildir, index, columns), columns)
        if loaded is None:
            return LoadedIndex(index, index_signature(maildir))
        return loaded

    def _tmp_sweep_due(self, maildir: Path) -> bool:
        last = self._tmp_swept.get(maildir)
        return last is None or time.monotonic() - last >= self._tmp_sweep_interval

    def _sweep_tmp(self, maildir: Path) -> None:
        """Remove dead deliveries from tmp/, at most once per interval per process."""
        if not self._tmp_sweep_due(maildir):
            return
        now = time.monotonic()
        _remove_stale_tmp(maildir / "tmp")
        if len(self._tmp_swept) >= MAX_KNOWN_MAILDIRS:
            self._tmp_swept.clear()  # forgetting only costs a sweep
        self._tmp_swept[maildir] = now

    def _ensure_maildir(self, maildir: Path) -> None:
        created = False
        for path in (self._root, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
            try:
                path.mkdir(mode=DIR_MODE)
                created = True
            except FileExistsError:
                pass
        if created:
            # A delivery into a brand-new Maildir is only durable with its directories.
            fsync_dir(self._root)
            fsync_dir(maildir)
        if len(self._known_maildirs) >= MAX_KNOWN_MAILDIRS:
            self._known_maildirs.clear()  # forgetting only costs the mkdir() attempts
        self._known_maildirs.add(maildir)

    # -- delivery -----------------------------------------------------------------

    async def deliver(self, user: str, message: bytes) -> str:
        maildir = self.maildir(user)
        return await asyncio.to_thread(self._delivery.deliver_sync, user, maildir, (message,))

    async def deliver_file(self, user: str, source: BinaryIO) -> str:
        """Like ``deliver``, reading the message from ``source`` in bounded chunks."""
        maildir = self.maildir(user)
        chunks = iter(lambda: source.read(CHUNK_SIZE), b"")
        return await asyncio.to_thread(self._delivery.deliver_sync, user, maildir, chunks)

    # -- usage --------------------------------------------------------------------

    async def usage(self, user: str) -> Usage:
        maildir = self.maildir(user)
        return await asyncio.to_thread(self._usage_sync, user, maildir)

    def _usage_sync(self, user: str, maildir: Path) -> Usage:
        with os_errors(f"usage of {user}"):
            try:
                cur_mtime = os.stat(maildir / "cur").st_mtime_ns
                new_names, _ = scan_messages(maildir / "new")
            except FileNotFoundError:
                return Usage(0, 0)
            header = read_header(maildir)
            if header is not None and header_is_current(header, cur_mtime):
                # Index totals cover cur/ exactly; new/ holds only unindexed arrivals.
                octets = header.octets + sum(
                    estimate_size(maildir / "new", name) for name in new_names.values()
                )
                return Usage(header.count + len(new_names), octets)
            cached = self._index_cache.peek(user)
            if cached is not None and cached.signature == index_signature(maildir):
                return count_usage(maildir, new_names, cached.index)
            try:
                index = read_index(maildir)
            except CorruptIndex:
                index = None
            return count_usage(maildir, new_names, index)

    async def close(self) -> None:
        # Nothing to close (no pool, no connection); the cached indexes are only memory.
        self._index_cache.clear()


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


def _remove_stale_tmp(tmp: Path) -> None:
    cutoff = time.time() - TMP_MAX_AGE
    with os.scandir(tmp) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


def _release_abandoned(opening: asyncio.Future[MaildirMaildrop]) -> None:
    """Release the maildrop of an open whose caller was cancelled meanwhile."""
    if opening.cancelled() or opening.exception() is not None:
        return
    opening.result().release_now()
