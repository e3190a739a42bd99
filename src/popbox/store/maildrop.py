"""One user's Maildir locked for one POP3 session: reads, wire-ready files, deletions.

The lock is a ``flock`` on ``popbox.lock`` in the Maildir (popbox.fileio.FileLock),
which also keeps a short note: the UIDVALIDITY of the last index built afresh, so
that a rebuild never repeats an old UIDL. The session's index comes from the store's
IndexCache and goes back to it, unchanged or as the commit wrote it, before unlocking.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Final

from popbox.errors import StoreError
from popbox.fileio import FileLock, fsync_dir
from popbox.store.base import MessageTable, WireReadyFile
from popbox.store.index import scan_messages, size_fields
from popbox.store.index_cache import IndexCache, LoadedIndex
from popbox.store.index_file import write_index
from popbox.store.maildir_errors import os_errors, store_error
from popbox.store.maildir_sync import trusted_mtime

__all__ = [
    "CHUNK_SIZE",
    "LOCK_NAME",
    "MaildirMaildrop",
    "record_uidvalidity",
    "recorded_uidvalidity",
]

LOCK_NAME: Final = "popbox.lock"
# The lock file holds one short note (the UIDVALIDITY); more than this is not ours.
MAX_LOCK_NOTE: Final = 64
# Sessions stream bodies in pieces of this size: memory per session stays bounded
# whatever the message size, and 64 KiB is what the transport writes at once anyway.
CHUNK_SIZE: Final = 64 * 1024
# Message files are opened without following a symlink swapped in after the scan.
_READ_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def recorded_uidvalidity(lock: FileLock) -> int:
    """The UIDVALIDITY last written into the held lock file (0 if none).

    The lock file outlives a lost or damaged index, so a rebuild can pick a larger
    UIDVALIDITY than any the old index had and never hand out an old UIDL again.
    """
    data = os.pread(lock.fd, MAX_LOCK_NOTE, 0)
    text = data.decode("ascii", "replace").strip()
    try:
        return int(text.removeprefix("uidvalidity="), 16)
    except ValueError:
        return 0


def record_uidvalidity(lock: FileLock, uidvalidity: int) -> None:
    """Note ``uidvalidity`` in the held lock file, durably, for ``recorded_uidvalidity``."""
    # Written in place: the lock lives on this inode, so it cannot be replaced.
    note = f"uidvalidity={uidvalidity:x}\n".encode("ascii")
    os.pwrite(lock.fd, note, 0)
    os.ftruncate(lock.fd, len(note))
    os.fsync(lock.fd)


class MaildirMaildrop:
    """One user's Maildir, locked and snapshotted for one POP3 session.

    Made by MaildirStore with the lock held and the index taken out of ``cache``;
    every way the session ends hands the index back to ``cache`` and unlocks.
    """

    def __init__(
        self, user: str, maildir: Path, lock: FileLock, loaded: LoadedIndex, cache: IndexCache
    ) -> None:
        self._user = user
        self._maildir = maildir
        self._lock = lock
        self._cache = cache
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
        # thread costs many times the open or a 64 KiB read from the page cache
        # (bench/maildir_index.py measures reads). Only the search for a renamed
        # file, a directory scan, goes to a thread.
        try:
            # An f-string, not Path /: this runs once per RETR, and a pathlib join
            # costs more than the formatting.
            fd = os.open(f"{self._maildir}/{self._path(index)}", _READ_FLAGS)
        except FileNotFoundError:
            fd = await asyncio.to_thread(self._open_moved, index, action)
        except OSError as exc:
            raise store_error(action, exc) from exc
        return fd, action

    async def read_message(self, index: int) -> AsyncIterator[bytes]:
        fd, action = await self._open_message(index)
        try:
            while True:
                with os_errors(action):
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
            raise store_error(action, exc) from exc
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
        with os_errors(action):
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
            # fsyncing it here was a large share of a login (docs/performance.md).
            self._cache.keep(self._user, self._loaded)
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
            with os_errors(action):
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
            loaded = LoadedIndex(self._index, signature, written)
            # Handed back before unlocking, so the next session finds it in the cache.
            self._cache.keep(self._user, loaded)
            if failure is not None:
                raise store_error(action, failure) from failure
        finally:
            self._lock.close()

    def _all_paths(self) -> dict[str, str]:
        paths: dict[str, str] = {}
        for directory in ("new", "cur"):
            names, _ = scan_messages(self._maildir / directory)
            paths.update((key, f"{directory}/{name}") for key, name in names.items())
        return paths

    async def release(self) -> None:
        self.release_now()

    def release_now(self) -> None:
        """``release`` for a caller that cannot await (the store, for an open nobody
        waits for any more): unlock without deleting anything; safe to call again."""
        if not self._released:
            self._released = True
            # Nothing changed: the index in memory still matches the file on disk.
            self._cache.keep(self._user, self._loaded)
            self._lock.close()
