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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

from popbox.errors import MaildropInUse, PermanentStoreError, StoreError
from popbox.store.base import MessageTable, Usage, WireReadyFile
from popbox.store.index import (
    CorruptIndex,
    IndexColumns,
    MaildirIndex,
    fsync_dir,
    scan_messages,
    size_fields,
    write_all,
)
from popbox.store.index_file import (
    INDEX_NAME,
    IndexSignature,
    index_signature,
    read_header,
    read_index,
    signature_of,
    write_index,
)
from popbox.store.maildir_sync import (
    count_usage,
    estimate_size,
    header_is_current,
    nothing_to_reconcile,
    reconcile,
    trusted_mtime,
)
from popbox.wireform import CrlfNormaliser, WireSizeCounter

__all__ = ["MaildirMaildrop", "MaildirStore"]

log = logging.getLogger(__name__)

LOCK_NAME: Final = "popbox.lock"
# Sessions stream bodies in pieces of this size: memory per session stays bounded
# whatever the message size, and 64 KiB is what the transport writes at once anyway.
CHUNK_SIZE: Final = 64 * 1024
# qmail's rule (maildir(5)): a tmp/ file untouched for 36 hours is a dead delivery.
TMP_MAX_AGE: Final = 36 * 3600
# How often one worker process sweeps a maildrop's tmp/ at login. Against a 36-hour
# age limit an hour's delay changes nothing, and it takes a directory listing off
# almost every login (2-3% of a login's samples in docs/performance.md).
TMP_SWEEP_INTERVAL: Final = 3600.0
# Maildirs this process made or found complete, remembered so that a login skips the
# five mkdir() attempts; past this many the memory is simply started afresh (a forgotten
# Maildir only costs its next login the attempts again).
MAX_KNOWN_MAILDIRS: Final = 100_000
# The lock file holds one short note (the UIDVALIDITY); more than this is not ours.
MAX_LOCK_NOTE: Final = 64
# Parsed indexes kept per worker process for maildrops no session holds, counted in
# messages (about 0.5 KB each): the 100,000-message maildrop of issue 6 fits, so its
# warm login skips parsing; many small maildrops share the rest.
INDEX_CACHE_MESSAGES: Final = 150_000
# A login opens a maildrop on the event loop, without a worker thread, only when its
# cached index is current and holds at most this many messages (a snapshot not made
# yet is per-message work), and new/ is a directory this small (an empty ext4
# directory that once held 100,000 names is 8 MB to read).
INLINE_OPEN_MAX_MESSAGES: Final = 10_000
INLINE_OPEN_MAX_NEW_BYTES: Final = 16 * 1024
# NAME_MAX on Linux filesystems; a longer user name cannot be a directory anyway.
MAX_USER_LENGTH: Final = 255
# Maildir directories and files are private to the mail owner (Dovecot, Postfix).
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
# Message files are opened without following a symlink swapped in after the scan.
_READ_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
# errnos that mean "this filesystem has no hard links": fall back to rename(), which
# is as atomic but would replace an existing name (our names are unique anyway).
_NO_LINK_ERRNOS: Final = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})


def _store_error(action: str, exc: OSError) -> StoreError:
    """THE translation of OSError into popbox errors for this backend."""
    if isinstance(exc, BlockingIOError):
        return MaildropInUse(f"{action}: maildrop is locked by another session")
    # Most filesystem trouble passes (space is freed, an operator fixes modes), so it
    # is temporary: the MTA retries and the client sees [SYS/TEMP], as with Dovecot.
    if exc.errno == errno.ENAMETOOLONG:
        return PermanentStoreError(f"{action}: {exc.strerror} ({exc.filename})")
    return StoreError(f"{action}: {exc.strerror or exc} ({exc.filename})")


@contextlib.contextmanager
def _os_errors(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _store_error(action, exc) from exc


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


# How many users' joined paths a store keeps (see MaildirStore._layouts).
MAX_LAYOUTS = 256


class _Layout:
    """The paths of one user's Maildir, joined once per process rather than per login.

    pathlib joins cost a microsecond or two each, and a Path made once keeps its
    string and hash, so the stats and set lookups of every later login are cheaper.
    """

    __slots__ = ("cur", "index", "lock", "maildir", "new")

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.lock = maildir / LOCK_NAME
        self.index = maildir / INDEX_NAME
        self.cur = maildir / "cur"
        self.new = maildir / "new"


class _FileLock:
    """An exclusive flock on the maildrop's lock file, held while the fd is open."""

    def __init__(self, path: Path) -> None:
        self._guard = threading.Lock()
        self._fd = -1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            # flock, not fcntl locks: it conflicts between two opens in one process too,
            # and the kernel drops it when the holder dies, so a crash never wedges it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def recorded_uidvalidity(self) -> int:
        """The UIDVALIDITY last written into the lock file (0 if none).

        The lock file outlives a lost or damaged index, so a rebuild can pick a larger
        UIDVALIDITY than any the old index had and never hand out an old UIDL again.
        """
        data = os.pread(self._fd, MAX_LOCK_NOTE, 0)
        text = data.decode("ascii", "replace").strip()
        try:
            return int(text.removeprefix("uidvalidity="), 16)
        except ValueError:
            return 0

    def record_uidvalidity(self, uidvalidity: int) -> None:
        # Written in place: the lock lives on this inode, so it cannot be replaced.
        note = f"uidvalidity={uidvalidity:x}\n".encode("ascii")
        os.pwrite(self._fd, note, 0)
        os.ftruncate(self._fd, len(note))
        os.fsync(self._fd)

    def __del__(self) -> None:
        # A session dropped without release() (a crashed task) must not keep the
        # maildrop locked for the life of the process.
        self.close()

    def close(self) -> None:
        # Called from the event loop (release) or a worker thread (commit).
        with self._guard:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class _LoadedIndex:
    """An index as read from or written to disk, with the signature of that file.

    The snapshot (UIDLs and sizes as a MessageTable) and the paths and UIDs in the
    same order are taken once per index version and shared by the sessions that open
    the maildrop while the file stays unchanged. For an index just read from its file
    they are the file's own columns, so a warm login on 100,000 messages makes no
    per-message object, even in a worker process that has never seen the maildrop.
    """

    __slots__ = ("_columns", "_table", "index", "signature")

    def __init__(
        self,
        index: MaildirIndex,
        signature: IndexSignature | None,
        columns: IndexColumns | None = None,
    ) -> None:
        self.index = index
        self.signature = signature
        # Given when known (just written, or kept after a commit); else taken from
        # the index on first use. Nobody changes them once taken.
        self._columns = columns
        self._table: MessageTable | None = None

    def snapshot(self) -> tuple[MessageTable, IndexColumns]:
        """The snapshot and the columns it came from, both in UID order."""
        if self._columns is None:
            self._columns = self.index.columns()
        if self._table is None:
            columns = self._columns
            # The index makes every UIDL as 16+ hex digits: checked by construction.
            # The core keeps the listings it renders in the table, once per version.
            self._table = MessageTable(columns.uidls, columns.sizes, uidls_checked=True)
        return self._table, self._columns


class MaildirMaildrop:
    """One user's Maildir, locked and snapshotted for one POP3 session."""

    def __init__(
        self, store: MaildirStore, user: str, lock: _FileLock, loaded: _LoadedIndex
    ) -> None:
        self._store = store
        self._user = user
        self._maildir = store.maildir(user)
        self._lock = lock
        self._loaded = loaded
        self._index = loaded.index
        self._infos, self._columns = loaded.snapshot()
        # Message keys by position, derived from the paths when first needed (a
        # rename search or a commit with deletions), not at every login.
        self._key_cache: tuple[str, ...] | None = None
        # Where a message was found after a rename since the snapshot, by position;
        # all others are where the snapshot's paths say (shared, not copied).
        self._moved: dict[int, str] = {}
        self._released = False

    @property
    def _keys(self) -> tuple[str, ...]:
        if self._key_cache is None:
            self._key_cache = tuple(path[4:].partition(":")[0] for path in self._columns.paths)
        return self._key_cache

    @property
    def user(self) -> str:
        return self._user

    @property
    def messages(self) -> MessageTable:
        return self._infos

    async def _open_message(self, index: int) -> tuple[int, str]:
        """Open message ``index`` for reading, following a rename; (fd, action text)."""
        action = f"read message {self._infos.uidls[index]} of {self._user}"
        # open() and read() of a local file stay on the event loop: a hop to a worker
        # thread costs ~150 us against ~3 us for the open and less than that for a
        # 64 KiB read from the page cache (bench/maildir_index.py measures reads).
        # Only the search for a renamed file, a directory scan, goes to a thread.
        try:
            # An f-string, not Path /: this runs once per RETR and pathlib costs ~1 us.
            fd = os.open(f"{self._maildir}/{self._path(index)}", _READ_FLAGS)
        except FileNotFoundError:
            fd = await asyncio.to_thread(self._open_moved, index, action)
        except OSError as exc:
            raise _store_error(action, exc) from exc
        return fd, action

    async def read_message(self, index: int) -> AsyncIterator[bytes]:
        fd, action = await self._open_message(index)
        try:
            while True:
                with _os_errors(action):
                    chunk = os.read(fd, CHUNK_SIZE)
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    async def open_wire_ready(self, index: int) -> WireReadyFile | None:
        """The message's file if its stored bytes are its wire form (but for dots).

        Wire size == file size holds exactly when the file has no bare LF and ends with
        a line end (or is empty): every bare LF adds one octet to the wire size and a
        missing final line end two. The snapshot's size is that wire size (from W= or
        from reading the file), so one fstat decides, and a name whose S= and W= differ
        (stored with LF) is refused without opening it.
        """
        wire_size = self._infos.sizes[index]
        stored, virtual = size_fields(self._path(index).rpartition("/")[2])
        if stored is not None and virtual is not None and stored != virtual:
            return None
        fd, action = await self._open_message(index)
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise _store_error(action, exc) from exc
        if size != wire_size:
            os.close(fd)
            return None
        # The open fd keeps the file readable whatever renames happen meanwhile.
        return WireReadyFile(fd, size)

    def _path(self, index: int) -> str:
        moved = self._moved.get(index)
        if moved is not None:
            return moved
        return self._columns.paths[index]

    def _open_moved(self, index: int, action: str) -> int:
        """Open a message that was renamed (flags changed by a MUA) since the snapshot."""
        with _os_errors(action):
            path = self._all_paths().get(self._keys[index])
            if path is None:
                raise StoreError(f"{action}: the message vanished")
            self._moved[index] = path
            return os.open(self._maildir / path, _READ_FLAGS)

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        if self._released:
            raise StoreError(f"maildrop of {self._user} was already released")
        self._released = True
        doomed = sorted(set(indexes))
        if doomed and not 0 <= doomed[0] <= doomed[-1] < len(self._infos):
            self._lock.close()  # a failed commit still ends the session
            raise IndexError(f"no message at index {doomed[0]} or {doomed[-1]}")
        if not doomed:
            # Nothing to delete: the index on disk was made durable when the maildrop
            # was opened (or was already current), so QUIT only unlocks. Rewriting and
            # fsyncing it here was 36-42% of a login (docs/performance.md).
            self._store._keep_index(self._user, self._loaded)
            self._lock.close()
            return
        # The worker thread unlocks when it is done, even if this task is cancelled
        # meanwhile: the lock must outlive the unlinks, not the awaiting coroutine.
        await asyncio.to_thread(self._commit_and_unlock, doomed)

    def _commit_and_unlock(self, doomed: list[int]) -> None:
        action = f"delete messages of {self._user}"
        try:
            failure: OSError | None = None
            relocated: dict[str, str] | None = None
            # The directories an unlink (or an attempt) touched: only they need an
            # fsync. The login moved new/ mail to cur/, so new/ is usually not one.
            touched: set[str] = set()
            for i in doomed:
                path = self._path(i)
                touched.add(path[:3])
                try:
                    os.unlink(self._maildir / path)
                except FileNotFoundError:
                    if relocated is None:
                        relocated = self._all_paths()
                    found = relocated.get(self._keys[i])
                    if found is not None:  # renamed since the snapshot; else already gone
                        touched.add(found[:3])
                        try:
                            os.unlink(self._maildir / found)
                        except FileNotFoundError:
                            pass
                        except OSError as exc:
                            failure = failure or exc
                            continue
                except OSError as exc:
                    failure = failure or exc
                    continue
                self._index.entries.pop(self._keys[i], None)
            with _os_errors(action):
                for directory in sorted(touched):
                    fsync_dir(self._maildir / directory)
                # After a failed unlink nobody knows what cur/ holds: make the next
                # login rescan it rather than trust its mtime.
                cur_mtime = os.stat(self._maildir / "cur").st_mtime_ns
                self._index.cur_mtime = 0 if failure else trusted_mtime(cur_mtime)
                written = self._index.columns()
                # The deletions are durable now. This index only drops their entries:
                # should the old one come back after a crash, the next login's
                # reconcile drops them again, with every other UIDL as it was. So its
                # rename needs no directory fsync of its own before QUIT's +OK.
                signature = write_index(self._maildir, self._index, written, durable=False)
            # The next snapshot is what the index now holds, as written.
            loaded = _LoadedIndex(self._index, signature, written)
            # Handed back before unlocking, so the next session finds it in the cache.
            self._store._keep_index(self._user, loaded)
            if failure is not None:
                raise _store_error(action, failure) from failure
        finally:
            self._lock.close()

    def _all_paths(self) -> dict[str, str]:
        paths: dict[str, str] = {}
        for directory in ("new", "cur"):
            names, _ = scan_messages(self._maildir / directory)
            paths.update((key, f"{directory}/{name}") for key, name in names.items())
        return paths

    async def release(self) -> None:
        if not self._released:
            self._released = True
            # Nothing changed: the index in memory still matches the file on disk.
            self._store._keep_index(self._user, self._loaded)
            self._lock.close()


class MaildirStore:
    """Maildirs under ``root``: ``root/USER`` holds one user's cur/, new/ and tmp/."""

    def __init__(
        self,
        root: Path,
        *,
        tmp_sweep_interval: float = TMP_SWEEP_INTERVAL,
        save_crlf: bool = False,
    ) -> None:
        """``save_crlf``: store delivered mail with CRLF line ends (``storage.save_crlf``,
        on by default in the config; off here, so a store made in code keeps bytes)."""
        self._root = Path(root)
        self._save_crlf = save_crlf
        # Cached once: gethostname() per delivery is a syscall for a constant. The
        # replacements are maildir(5)'s, plus ',' which starts the size fields.
        host = socket.gethostname() or "localhost"
        self._host = host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
        self._sequence = itertools.count(1)
        # Parsed indexes of maildrops no session holds, by user, least recently used
        # first; valid while the index file's signature is unchanged.
        self._cache: OrderedDict[str, _LoadedIndex] = OrderedDict()
        self._cache_guard = threading.Lock()
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
        maildir = layout.maildir
        unchanged = self._open_unchanged(user, layout)
        if unchanged is not None:
            return unchanged
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_sync, user, maildir))
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
        with self._cache_guard:
            loaded = self._cache.get(user)
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
            lock = _FileLock(layout.lock)
        except OSError:
            return None  # in use, or gone: the worker thread reports it
        try:
            current = self._cached_index(user, maildir)
            if current is None:
                lock.close()
                return None
            if nothing_to_reconcile(
                maildir, current.index, INLINE_OPEN_MAX_NEW_BYTES, cur=layout.cur, new=layout.new
            ):
                return MaildirMaildrop(self, user, lock, current)
            self._keep_index(user, current)  # the worker thread takes it from here
        except OSError:
            pass  # the worker thread tries again and reports what it finds
        except BaseException:
            lock.close()
            raise
        lock.close()
        return None

    def _open_sync(self, user: str, maildir: Path) -> MaildirMaildrop:
        with _os_errors(f"open maildrop of {user}"):
            known = maildir in self._known_maildirs
            try:
                return self._open_locked(user, maildir)
            except FileNotFoundError:
                if not known:
                    raise
                # Removed (whole or in part) since this process last saw it: make it
                # again and start over. Nothing was written: every missing directory
                # is noticed before the index changes, and the cached index that may
                # have been touched was taken out of the cache, so it is read afresh.
                self._known_maildirs.discard(maildir)
                return self._open_locked(user, maildir)

    def _open_locked(self, user: str, maildir: Path) -> MaildirMaildrop:
        if maildir not in self._known_maildirs:
            self._ensure_maildir(maildir)
        lock = _FileLock(maildir / LOCK_NAME)
        try:
            loaded = self._sync_index(user, maildir, lock)
            return MaildirMaildrop(self, user, lock, loaded)
        except BaseException:
            lock.close()
            raise

    def _keep_index(self, user: str, loaded: _LoadedIndex) -> None:
        """Cache the index of a maildrop a session is done with (bounded, LRU)."""
        with self._cache_guard:
            self._cache.pop(user, None)
            if len(loaded.index) > INDEX_CACHE_MESSAGES:
                return
            self._cache[user] = loaded
            total = sum(len(item.index) for item in self._cache.values())
            while total > INDEX_CACHE_MESSAGES:
                _, evicted = self._cache.popitem(last=False)
                total -= len(evicted.index)

    def _cached_index(self, user: str, maildir: Path) -> _LoadedIndex | None:
        """The cached index if the file is still the one it was read from or wrote."""
        with self._cache_guard:
            # Taken out: the session owns (and may change) it until it hands it back.
            loaded = self._cache.pop(user, None)
        if loaded is None or loaded.signature != signature_of(self._layout(user).index):
            return None
        return loaded

    def _sync_index(self, user: str, maildir: Path, lock: _FileLock) -> _LoadedIndex:
        """Bring the index in line with cur/ and new/; called with the lock held."""
        loaded = self._cached_index(user, maildir)
        if loaded is not None:
            index, changed = loaded.index, False
        else:
            index, changed = _load_or_rebuild(user, maildir, lock)
        self._sweep_tmp(maildir)
        changed |= reconcile(user, maildir, index)
        if changed:
            columns = index.columns()
            return _LoadedIndex(index, write_index(maildir, index, columns), columns)
        if loaded is None:
            return _LoadedIndex(index, index_signature(maildir))
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
        return await asyncio.to_thread(self._deliver_sync, user, maildir, (message,))

    async def deliver_file(self, user: str, source: BinaryIO) -> str:
        """Like ``deliver``, reading the message from ``source`` in bounded chunks."""
        maildir = self.maildir(user)
        chunks = iter(lambda: source.read(CHUNK_SIZE), b"")
        return await asyncio.to_thread(self._deliver_sync, user, maildir, chunks)

    def _unique_name(self) -> str:
        # time.MusecPpidQseqRrandom.host: Dovecot's shape. pid+seq make it unique in
        # this host's processes; the random part covers pid reuse and shared roots.
        now = time.time()
        return (
            f"{int(now)}.M{int(now % 1 * 1_000_000):06d}P{os.getpid()}"
            f"Q{next(self._sequence)}R{secrets.token_hex(8)}.{self._host}"
        )

    def _deliver_sync(self, user: str, maildir: Path, chunks: Iterable[bytes]) -> str:
        action = f"deliver to {user}"
        with _os_errors(action):
            base = self._unique_name()
            tmp_path = maildir / "tmp" / base
            counter = WireSizeCounter()
            # CRLF on disk (Dovecot's mail_save_crlf): the file is then its own wire
            # form but for dot-stuffing, and RETR can send it with sendfile.
            normaliser = CrlfNormaliser() if self._save_crlf else None
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(tmp_path, flags, FILE_MODE)
            except FileNotFoundError:
                # The first delivery to this user (or the Maildir was removed): make
                # it. Checking first would cost every other delivery five syscalls.
                self._ensure_maildir(maildir)
                fd = os.open(tmp_path, flags, FILE_MODE)
            try:
                try:
                    for chunk in chunks:
                        if normaliser is not None:
                            chunk = normaliser.convert(chunk)
                        counter.feed(chunk)
                        write_all(fd, chunk)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # W= means Dovecot's virtual size, which is the wire size only for a
                # message that ends with a line end; for one that does not, W= is
                # left out so whoever indexes it counts it exactly (a rare case:
                # SMTP and LMTP always end a message with CRLF).
                name = f"{base},S={counter.stored}"
                if counter.terminated:
                    name += f",W={counter.virtual}"
                _link_no_clobber(tmp_path, maildir / "new" / name)
            finally:
                # Gone after the link; on any failure this removes the partial file.
                with contextlib.suppress(OSError):
                    tmp_path.unlink(missing_ok=True)
            try:
                fsync_dir(maildir / "new")
            except OSError:
                # Not durable, so not delivered: take it back rather than report a
                # failure for a message that may still show up.
                with contextlib.suppress(OSError):
                    (maildir / "new" / name).unlink()
                raise
        return name

    # -- usage --------------------------------------------------------------------

    async def usage(self, user: str) -> Usage:
        maildir = self.maildir(user)
        return await asyncio.to_thread(self._usage_sync, user, maildir)

    def _usage_sync(self, user: str, maildir: Path) -> Usage:
        with _os_errors(f"usage of {user}"):
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
            with self._cache_guard:
                cached = self._cache.get(user)
            if cached is not None and cached.signature == index_signature(maildir):
                return count_usage(maildir, new_names, cached.index)
            try:
                index = read_index(maildir)
            except CorruptIndex:
                index = None
            return count_usage(maildir, new_names, index)

    async def close(self) -> None:
        # Nothing to close (no pool, no connection); the cached indexes are only memory.
        with self._cache_guard:
            self._cache.clear()


def _load_or_rebuild(user: str, maildir: Path, lock: _FileLock) -> tuple[MaildirIndex, bool]:
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
    floor = max(floor, lock.recorded_uidvalidity())
    uidvalidity = max(int(time.time()), floor + 1)
    lock.record_uidvalidity(uidvalidity)
    return MaildirIndex(uidvalidity=uidvalidity), True


def _remove_stale_tmp(tmp: Path) -> None:
    cutoff = time.time() - TMP_MAX_AGE
    with os.scandir(tmp) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


def _link_no_clobber(source: Path, target: Path) -> None:
    """link() then the caller unlinks: never replaces an existing message (maildir(5))."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        os.rename(source, target)


def _release_abandoned(opening: asyncio.Future[MaildirMaildrop]) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    maildrop = opening.result()
    maildrop._lock.close()
