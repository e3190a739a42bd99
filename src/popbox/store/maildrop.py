"""One folder of a user's Maildir locked for one POP3 session: reads, wire-ready files,
the QUIT commit.

The lock is a ``flock`` on ``popbox.lock`` in the folder's Maildir (popbox.fileio.
FileLock), which also keeps a short note: the UIDVALIDITY of the last index built
afresh, so that a rebuild never repeats an old UIDL. The session's index and device
state come from the store's IndexCache and go back to it, unchanged or as the commit
wrote them, before unlocking. The session sees the folder as its device does
(store.maildir_view); its commit records the device's deletions and removes what the
rules (store.devices) say may go, files first and the state after, so a crash between
the two costs at most this device's unacknowledged deletions.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.errors import StoreError
from popbox.fileio import FileLock
from popbox.store.base import MessageTable, WireReadyFile
from popbox.store.devices import FolderState, RemovalPlan, plan_commit, plan_removal
from popbox.store.index import size_fields
from popbox.store.index_cache import IndexCache, LoadedIndex
from popbox.store.mailbox import MailboxPolicy, MailboxView
from popbox.store.maildir_errors import os_errors, store_error
from popbox.store.maildir_removal import READ_FLAGS, Destination, FolderFiles, carry_out
from popbox.store.maildir_state import LoadedState, write_state
from popbox.store.maildir_view import MaildropView

__all__ = [
    "CHUNK_SIZE",
    "LOCK_NAME",
    "FolderPlace",
    "MaildirMaildrop",
    "StoreServices",
    "record_uidvalidity",
    "recorded_uidvalidity",
]

log = logging.getLogger(__name__)

LOCK_NAME: Final = "popbox.lock"
# The lock file holds one short note (the UIDVALIDITY); more than this is not ours.
MAX_LOCK_NOTE: Final = 64
# Sessions stream bodies in pieces of this size: memory per session stays bounded
# whatever the message size, and 64 KiB is what the transport writes at once anyway.
CHUNK_SIZE: Final = 64 * 1024


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


@dataclass(frozen=True, slots=True)
class FolderPlace:
    """One folder of a user's mailbox: its name, its Maildir and its IndexCache key."""

    user: str
    folder: str
    maildir: Path
    key: str


@dataclass(frozen=True, slots=True)
class StoreServices:
    """What a maildrop (and a sweep) needs from the store beyond its own folder."""

    cache: IndexCache
    clock: Callable[[], float]
    """The time the store believes it is."""
    destination: Callable[[str, str], Destination]
    """(user, folder) -> where a move into that folder goes, the folder made if
    missing."""


class MaildirMaildrop:
    """One folder of a user's Maildir, locked and snapshotted for one POP3 session.

    Made by MaildirStore with the lock held, the index (with the folder's state) taken
    out of the cache and the device's ``view`` of it; every way the session ends
    hands the index back to the cache and unlocks. Indexes are the view's positions;
    ``view.position`` turns them into the index's.
    """

    def __init__(
        self,
        place: FolderPlace,
        lock: FileLock,
        loaded: LoadedIndex,
        view: MaildropView,
        mailbox_view: MailboxView,
        services: StoreServices,
    ) -> None:
        self._place = place
        self._maildir = place.maildir
        self._lock = lock
        self._services = services
        self._loaded = loaded
        self._index = loaded.index
        self._view = view
        self._mailbox_view = mailbox_view
        self._infos = view.table
        self._files = FolderFiles(place.maildir, loaded.snapshot()[1])
        # View positions of the messages RETR sent whole, for a retention (EXPIRE).
        self._retrieved: set[int] = set()
        self._released = False

    @property
    def user(self) -> str:
        return self._place.user

    @property
    def messages(self) -> MessageTable:
        return self._infos

    async def _open_message(self, index: int) -> tuple[int, str]:
        """Open message ``index`` for reading, following a rename; (fd, action text)."""
        action = f"read message {self._infos.uidls[index]} of {self._place.user}"
        position = self._view.position(index)
        # open() and read() of a local file stay on the event loop: a hop to a worker
        # thread costs many times the open or a 64 KiB read from the page cache
        # (bench/maildir_index.py measures reads). Only the search for a renamed
        # file, a directory scan, goes to a thread.
        try:
            # An f-string, not Path /: this runs once per RETR, and a pathlib join
            # costs more than the formatting.
            fd = os.open(f"{self._maildir}/{self._files.path(position)}", READ_FLAGS)
        except FileNotFoundError:
            fd = await asyncio.to_thread(self._open_moved, position, action)
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
        path = self._files.path(self._view.position(index))
        stored, virtual = size_fields(path.rpartition("/")[2])
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

    def _open_moved(self, position: int, action: str) -> int:
        """Open a message that was renamed (flags changed by a MUA) since the snapshot."""
        with os_errors(action):
            fd = self._files.open_moved(position)
        if fd is None:
            raise StoreError(f"{action}: the message vanished")
        return fd

    def mark_retrieved(self, index: int) -> None:
        if not 0 <= index < len(self._infos):
            raise IndexError(f"no message at index {index}")
        self._retrieved.add(index)

    def _uids_at(self, indexes: Collection[int]) -> list[int]:
        uids = self._files.columns.uids
        return [uids[position] for position in self._view.positions(indexes)]

    def _state(self) -> LoadedState:
        state = self._loaded.state
        assert state is not None, "a maildrop is opened with its folder's state"
        return state

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        if self._released:
            raise StoreError(f"maildrop of {self._place.user} was already released")
        if self._mailbox_view.inspect:
            await self.release()
            raise StoreError("an inspecting view cannot delete messages")
        self._released = True
        doomed = sorted(set(indexes))
        if doomed and not 0 <= doomed[0] <= doomed[-1] < len(self._infos):
            self._lock.close()  # a failed commit still ends the session
            raise IndexError(f"no message at index {doomed[0]} or {doomed[-1]}")
        policy = self._mailbox_view.policy
        retrieved = sorted(self._retrieved) if policy.retention_days is not None else []
        plan: RemovalPlan | None = None
        if not doomed and not retrieved:
            # Nothing of this session to record: only what the rules say may go now
            # (usually nothing, then QUIT only unlocks: the index and the state on
            # disk are current). Rewriting and fsyncing the index here was a large
            # share of a login (docs/performance.md).
            state = self._state().state
            if _nothing_to_plan(state, policy):
                self._services.cache.keep(self._place.key, self._loaded)
                self._lock.close()
                return
            revision = state.revision
            plan = plan_removal(
                state,
                self._files.columns.uids,
                now=self._services.clock(),
                folder=self._place.folder,
                policy=policy,
            )
            if not plan and state.revision == revision:
                self._services.cache.keep(self._place.key, self._loaded)
                self._lock.close()
                return
        # The worker thread unlocks when it is done, even if this task is cancelled
        # meanwhile: the lock must outlive the removals, not the awaiting coroutine.
        await asyncio.to_thread(self._commit_and_unlock, plan, doomed, retrieved)

    def _commit_and_unlock(
        self, plan: RemovalPlan | None, doomed: list[int], retrieved: list[int]
    ) -> None:
        place = self._place
        action = f"delete messages of {place.user}"
        try:
            loaded_state = self._state()
            state = loaded_state.state
            now = self._services.clock()
            if plan is None:
                plan = plan_commit(
                    state,
                    self._files.columns.uids,
                    device=self._mailbox_view.device,
                    deleted=self._uids_at(doomed),
                    retrieved=self._uids_at(retrieved),
                    now=now,
                    folder=place.folder,
                    policy=self._mailbox_view.policy,
                )
            with os_errors(action):
                # Files first: a crash before the state is written loses only this
                # device's record of deletions it was never told were done.
                removal = carry_out(
                    self._files,
                    self._index,
                    plan,
                    lambda folder: self._services.destination(place.user, folder),
                )
                if removal is not None:
                    state.prune(removal.columns.uids)
                if loaded_state.changed():
                    write_state(self._maildir, loaded_state)
            loaded = self._loaded
            if removal is not None:
                # The next snapshot is what the index now holds, as written.
                loaded = LoadedIndex(self._index, removal.signature, removal.columns)
                loaded.state = loaded_state
            # Handed back before unlocking, so the next session finds it in the cache.
            self._services.cache.keep(place.key, loaded)
            if removal is not None and removal.failure is not None:
                raise store_error(action, removal.failure) from removal.failure
        finally:
            self._lock.close()

    async def release(self) -> None:
        if self._released:
            return
        if self._retrieved and self._mailbox_view.policy.retention_days is not None:
            self._released = True
            await asyncio.to_thread(self._note_retrievals_and_unlock)
        else:
            self.release_now()

    def _note_retrievals_and_unlock(self) -> None:
        """Record first retrievals for a retention (RFC 2449 EXPIRE) and unlock; best
        effort: a session that ends without QUIT promised nothing."""
        try:
            loaded_state = self._state()
            loaded_state.state.record_retrievals(
                self._uids_at(self._retrieved), self._services.clock()
            )
            if loaded_state.changed():
                try:
                    write_state(self._maildir, loaded_state)
                except OSError as exc:
                    log.warning(
                        "maildrop of %s: retrievals not recorded: %s", self._place.user, exc
                    )
                    self._loaded.state = None  # ahead of its file: read it afresh
            self._services.cache.keep(self._place.key, self._loaded)
        finally:
            self._lock.close()

    def release_now(self) -> None:
        """``release`` for a caller that cannot await (the store, for an open nobody
        waits for any more): unlock without deleting anything; safe to call again."""
        if not self._released:
            self._released = True
            # Nothing changed: the index and state in memory still match their files.
            self._services.cache.keep(self._place.key, self._loaded)
            self._lock.close()


def _nothing_to_plan(state: FolderState, policy: MailboxPolicy) -> bool:
    """Whether ``plan_removal`` would find nothing, seen without running it: it only
    ever removes what a device deleted, what a retention expired or what was hidden
    (a single device's QUIT leaves none of them behind, and this is its every QUIT)."""
    return (
        policy.retention_days is None
        and not state.hidden()
        and not any(record.deleted for record in state.devices.values())
    )
