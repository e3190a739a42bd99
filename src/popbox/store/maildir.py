"""The Maildir mail store: each user's mail in ``root/USER/{cur,new,tmp}``, or where a
``MailLocation`` (store.location) says.

Interchangeable with Postfix, Dovecot, getmail and mutt: any Maildir name in new/ or
cur/ is a message, with or without ``,S=``/``,W=`` sizes and ``:2,FLAGS`` info. A
session's login takes a ``flock`` on ``popbox.lock`` (the kernel drops it when the
process dies), reconciles the directory with the index (store.index), assigns UIDLs
to messages it has not seen, and moves new/ mail to cur/ as every Maildir reader
does. Delivery never takes that lock: tmp/ -> fsync -> link into new/ -> fsync.
Delivered mail is stored with CRLF line ends unless ``save_crlf`` is off, so that RETR
can send the file as it is (``open_wire_ready``); LF-stored mail is served as well.

Folders other than INBOX are Maildir++ folders, ``root/USER/.NAME``, each a Maildir
with its own lock, index and device state (store.maildir_folders): a login opens one
folder as one device sees it, and a commit or a sweep removes what the rules of
store.devices say may go, deleting it or moving it to Trash or Archive.

Sizes are indexed once: from W= in the name (Dovecot's "virtual size", not opened),
else by reading the file. W= leaves out the CRLF that RETR adds after a last line
without one, so popbox writes W= only for messages that end with a line end; a
foreign unterminated message with W= is listed 2 octets short, as Dovecot lists it.

If the index is lost or damaged it is rebuilt from the files: no message is lost,
but the rebuilt index has a new UIDVALIDITY, so every UIDL changes once and clients
that keep mail on the server download it again (the safe direction: a changed UIDL
costs a duplicate, a reused one would cost a lost message); the devices' deletions
go with the old UIDs, so every device sees the folder whole again. An index in the
format of an earlier popbox is converted at the next login with every UIDL kept; an
earlier popbox that meets a newer index rebuilds it, so a downgrade changes every
UIDL once.

A message delivered with the UIDL of the server popbox replaced (``deliver(uidl=)``),
or given one in place (``adopt_uidls``), keeps it for ever beside its UID: the
folder's ``popbox.uidls`` (store.maildir_uidls) holds them and says which message
serves a UIDL when two claim it.

This module is the store's front (opening maildrops, delivery, usage, upkeep); the
session's maildrop and its lock are in store.maildrop, folders and their paths in
store.maildir_folders, what a device sees in store.maildir_view, the device state's
file in store.maildir_state, removals in store.maildir_removal, sweeps and device
reports in store.maildir_upkeep, the indexes kept between sessions in
store.index_cache, delivery in store.maildir_deliver, reconciling the index with the
directories in store.maildir_sync, the index itself in store.index and
store.index_file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

from popbox.errors import LoginTooSoon, MaildropInUse, NoSuchFolder, StoreError, TooManyDevices
from popbox.fileio import FileLock
from popbox.store.base import Usage
from popbox.store.image import FolderImage, ReadBody, RestoreReport
from popbox.store.index_cache import IndexCache, LoadedIndex
from popbox.store.index_file import index_signature, signature_of, write_index
from popbox.store.location import MailLocation
from popbox.store.mailbox import (
    DAY,
    DEFAULT_DEVICE,
    DEFAULT_VIEW,
    INBOX,
    AdoptReport,
    DeviceReport,
    MailboxPolicy,
    MailboxView,
    SweepReport,
    check_device_name,
    check_uidl,
)
from popbox.store.maildir_deliver import MaildirDelivery
from popbox.store.maildir_errors import os_errors
from popbox.store.maildir_folders import MAX_LAYOUTS, FolderLayout, Mailboxes, check_user
from popbox.store.maildir_image import (
    MaildirImageSource,
    open_image,
    remove_folder,
    restore_image,
)
from popbox.store.maildir_removal import Destination
from popbox.store.maildir_state import write_state
from popbox.store.maildir_sync import nothing_to_reconcile
from popbox.store.maildir_uidls import adopt
from popbox.store.maildir_upkeep import (
    folder_devices,
    folder_usage,
    forget_in_folders,
    sweep_folder,
)
from popbox.store.maildrop import CHUNK_SIZE, MaildirMaildrop, StoreServices

__all__ = ["MAX_LAYOUTS", "MaildirStore", "check_user"]

# How often one worker process sweeps a maildrop's tmp/ at login. Against a 36-hour
# age limit an hour's delay changes nothing, and it takes a directory listing off
# almost every login (docs/performance.md).
TMP_SWEEP_INTERVAL: Final = 3600.0
# A login opens a maildrop on the event loop, without a worker thread, only when its
# cached index is current and holds at most this many messages (a snapshot not made
# yet is per-message work), and new/ is a directory this small (an empty ext4
# directory that once held 100,000 names is 8 MB to read).
INLINE_OPEN_MAX_MESSAGES: Final = 10_000
INLINE_OPEN_MAX_NEW_BYTES: Final = 16 * 1024


class MaildirStore:
    """Maildirs under ``root``: ``root/USER`` holds one user's cur/, new/ and tmp/,
    and ``root/USER/.NAME`` the user's folder NAME (or the Maildir the location names,
    and ``.NAME`` inside it)."""

    def __init__(
        self,
        root: Path,
        *,
        tmp_sweep_interval: float = TMP_SWEEP_INTERVAL,
        save_crlf: bool = False,
        index_cache: IndexCache | None = None,
        clock: Callable[[], float] = time.time,
        location: MailLocation | None = None,
    ) -> None:
        """``save_crlf``: store delivered mail with CRLF line ends (``storage.save_crlf``,
        on by default in the config; off here, so a store made in code keeps bytes).
        ``index_cache``: where parsed indexes wait between sessions (one of its own if
        not given). ``clock``: the time the store believes it is (logins, retention,
        the time in new names), so tests move days forward without sleeping.
        ``location``: where each user's Maildir is (store.location); ``root/USER``
        when not given."""
        self._root = Path(root)
        # Parsed indexes of folders no session holds; each maildrop opened is given
        # the cache and hands its index back to it when its session ends.
        self._index_cache = index_cache if index_cache is not None else IndexCache()
        self._clock = clock
        self._mailboxes = Mailboxes(self._root, self._index_cache, tmp_sweep_interval, location)
        self._delivery = MaildirDelivery(
            save_crlf=save_crlf, make_maildir=self._mailboxes.ensure_maildir, clock=clock
        )
        self._services = StoreServices(self._index_cache, clock, self._destination)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def mailboxes(self) -> Mailboxes:
        """The folders' paths as this store knows them."""
        return self._mailboxes

    def maildir(self, user: str, folder: str = INBOX) -> Path:
        """The Maildir of ``user``'s ``folder``; raises PermanentStoreError for a path
        trick (InvalidMailboxName for a folder name)."""
        return self._mailboxes.layout(user, folder).maildir

    def _destination(self, user: str, folder: str) -> Destination:
        """Where a commit or a sweep moves messages into ``folder`` (made if missing):
        new names come from the delivery's, so they start with the time of the move."""
        return Destination(self._mailboxes.folder_maildir(user, folder), self._delivery.unique_name)

    # -- sessions ---------------------------------------------------------------

    async def open_maildrop(self, user: str, view: MailboxView = DEFAULT_VIEW) -> MaildirMaildrop:
        if view.device != DEFAULT_DEVICE:  # the default is a name; others are checked
            check_device_name(view.device)  # before anything is made on disk
        layout = self._mailboxes.layout(user, view.folder)
        unchanged = self._open_unchanged(layout, view)
        if unchanged is not None:
            return unchanged
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_sync, layout, view))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread goes on and may take the lock; whoever cancelled us will never
            # see the maildrop, so give the lock back as soon as the thread is done.
            opening.add_done_callback(_release_abandoned)
            raise

    def _open_unchanged(self, layout: FolderLayout, view: MailboxView) -> MaildirMaildrop | None:
        """Open on the event loop a small folder whose cached index and state are current.

        A poll that finds nothing new costs the store a handful of syscalls on
        inodes this process touched lately (lock, index and state stats, cur/ stat,
        new/ listing), less than the hop to a worker thread and back, which was most
        of the store's share of a login (docs/performance.md). Anything else, a big,
        changed, locked or unknown folder, or a login whose note must be written,
        gives up (None) before it could block for long, and the worker thread does
        the whole open as before.
        """
        maildir = layout.maildir
        key = layout.place.key
        loaded = self._index_cache.peek(key)
        if (
            loaded is None
            or loaded.state is None
            or len(loaded.index) > INLINE_OPEN_MAX_MESSAGES
            or loaded.index.written_in_new
            or not loaded.index.cur_mtime
            or not self._mailboxes.is_known(maildir)
            or self._mailboxes.tmp_sweep_due(maildir)
        ):
            return None
        try:
            lock = FileLock(layout.lock)
        except OSError:
            return None  # in use, or gone: the worker thread reports it
        try:
            current = self._mailboxes.current_index(layout)
            if current is None:
                lock.close()
                return None
            if nothing_to_reconcile(
                maildir, current.index, INLINE_OPEN_MAX_NEW_BYTES, cur=layout.cur, new=layout.new
            ):
                try:
                    admitted = self._admit(layout, lock, current, view, may_write=False)
                except (LoginTooSoon, TooManyDevices):
                    self._index_cache.keep(key, current)
                    raise
                if admitted is not None:
                    return admitted
            self._index_cache.keep(key, current)  # the worker thread takes it from here
        except OSError:
            pass  # the worker thread tries again and reports what it finds
        except BaseException:
            lock.close()
            raise
        lock.close()
        return None

    def _open_sync(self, layout: FolderLayout, view: MailboxView) -> MaildirMaildrop:
        maildir = layout.maildir
        with os_errors(f"open maildrop of {layout.place.key}"):
            known = self._mailboxes.is_known(maildir)
            try:
                return self._open_locked(layout, view)
            except FileNotFoundError:
                if not known:
                    raise
                # Removed (whole or in part) since this process last saw it: make it
                # again and start over. Nothing was written: every missing directory
                # is noticed before the index changes, and the cached index that may
                # have been touched was taken out of the cache, so it is read afresh.
                self._mailboxes.forget(maildir)
                return self._open_locked(layout, view)

    def _open_locked(self, layout: FolderLayout, view: MailboxView) -> MaildirMaildrop:
        maildir = layout.maildir
        if not self._mailboxes.is_known(maildir):
            if layout.place.folder != INBOX and not self._mailboxes.exists(layout):
                raise NoSuchFolder(f"{layout.place.user} has no folder {layout.place.folder}")
            self._mailboxes.ensure_maildir(maildir)
        lock = FileLock(layout.lock)
        try:
            loaded = self._mailboxes.sync_index(layout, lock)
            try:
                admitted = self._admit(layout, lock, loaded, view, may_write=True)
            except (LoginTooSoon, TooManyDevices):
                self._index_cache.keep(layout.place.key, loaded)  # nothing changed
                raise
            assert admitted is not None  # a worker thread may write the state
            return admitted
        except BaseException:
            lock.close()
            raise

    def _admit(
        self,
        layout: FolderLayout,
        lock: FileLock,
        loaded: LoadedIndex,
        view: MailboxView,
        *,
        may_write: bool,
    ) -> MaildirMaildrop | None:
        """Note the device's login in the folder's state and make its maildrop; None
        if the state must be read or written and ``may_write`` is False (the event
        loop's quick open: the worker thread does it). Raises LoginTooSoon or
        TooManyDevices with nothing changed."""
        if may_write:
            must_write = self._mailboxes.load_state(layout, loaded)
        else:
            cached = loaded.state
            if (
                cached is None
                or cached.signature != signature_of(layout.state)
                or cached.state.uidvalidity != loaded.index.uidvalidity
            ):
                return None
            must_write = False
        assert loaded.state is not None
        state = loaded.state.state
        now = self._clock()
        if view.inspect:
            # popbox's own look: no login noted, everything stored but the hidden.
            device, excluded = None, state.hidden()
        else:
            device, excluded = view.device, state.excluded_for(view.device)
            if state.log_in(view.device, now, holds=not view.recent, policy=view.policy):
                must_write = True
        if must_write:
            if not may_write:
                loaded.state = None  # changed in memory only: read afresh by the thread
                return None
            write_state(layout.maildir, loaded.state)
        cutoff = now - view.policy.recent_days * DAY if view.recent else None
        device_view = loaded.view(device, excluded, cutoff)
        return MaildirMaildrop(layout.place, lock, loaded, device_view, view, self._services)

    # -- delivery -----------------------------------------------------------------

    async def deliver(
        self,
        user: str,
        message: bytes,
        *,
        folder: str = INBOX,
        uidl: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        """base.MailStore.deliver. ``delivery_id`` is accepted and ignored: a Maildir
        keeps no record of past deliveries, so a delivery that comes again (an MTA's
        retry after a lost reply) is stored again, as Dovecot's and Postfix's would be."""
        if uidl is not None:
            check_uidl(uidl)
        layout = self._mailboxes.layout(user, folder)
        return await asyncio.to_thread(self._deliver_sync, layout, (message,), uidl)

    async def deliver_file(
        self, user: str, source: BinaryIO, *, folder: str = INBOX, uidl: str | None = None
    ) -> str:
        """Like ``deliver``, reading the message from ``source`` in bounded chunks."""
        if uidl is not None:
            check_uidl(uidl)
        layout = self._mailboxes.layout(user, folder)
        chunks = iter(lambda: source.read(CHUNK_SIZE), b"")
        return await asyncio.to_thread(self._deliver_sync, layout, chunks, uidl)

    def _deliver_sync(self, layout: FolderLayout, chunks: Iterable[bytes], uidl: str | None) -> str:
        maildir = layout.maildir
        if layout.place.folder != INBOX and not self._mailboxes.is_known(maildir):
            # A folder is checked to be one (not a symlink planted in its place) once
            # per process; INBOX is made on the first delivery's ENOENT, as always.
            with os_errors(f"deliver to {layout.place.key}"):
                self._mailboxes.ensure_maildir(maildir)
        return self._delivery.deliver_sync(layout.place.user, maildir, chunks, uidl)

    # -- UIDLs kept from another server ------------------------------------------------

    async def adopt_uidls(
        self,
        user: str,
        uidls: Mapping[str, str],
        *,
        folder: str = INBOX,
        order: Sequence[str] = (),
    ) -> AdoptReport:
        """Give mail already in the Maildir the UIDLs the server popbox replaces served.

        ``uidls`` maps message keys (file names up to the first ``:``, as Dovecot
        or Courier left them) to UIDLs; each such message keeps its UIDL for ever,
        as if delivered with ``deliver(uidl=)`` (store.maildir_uidls has the rule).
        ``order`` (keys) numbers the messages the folder's first index meets, so
        message numbers match the old server's where they can; an index that
        exists keeps its numbering. Idempotent: the same mapping again changes
        nothing. Takes the folder's lock: MaildropInUse if a session holds it,
        NoSuchFolder for a folder other than INBOX that does not exist.
        """
        layout = self._mailboxes.layout(user, folder)
        wanted = dict(uidls)
        return await asyncio.to_thread(self._adopt_sync, layout, wanted, tuple(order))

    def _adopt_sync(
        self, layout: FolderLayout, uidls: dict[str, str], order: tuple[str, ...]
    ) -> AdoptReport:
        place = layout.place
        with os_errors(f"adopt UIDLs in {place.key}"):
            if not self._mailboxes.is_known(layout.maildir):
                if place.folder != INBOX and not self._mailboxes.exists(layout):
                    raise NoSuchFolder(f"{place.user} has no folder {place.folder}")
                self._mailboxes.ensure_maildir(layout.maildir)
            try:
                lock = FileLock(layout.lock)
            except BlockingIOError:
                raise MaildropInUse(f"folder {place.folder} of {place.user} is in use") from None
            with lock:
                first = index_signature(layout.maildir) is None
                loaded = self._mailboxes.sync_index(layout, lock, order)
                report, adopted = adopt(place.key, layout.maildir, loaded.index, uidls)
                if adopted:
                    # Written again even if unchanged: a new index file is what tells
                    # every worker process's cache that its snapshot is out of date.
                    index = loaded.index
                    columns = index.columns()
                    kept = LoadedIndex(index, write_index(layout.maildir, index, columns), columns)
                    kept.state = loaded.state
                    loaded = kept
                self._index_cache.keep(place.key, loaded)
        return dataclasses.replace(report, ordered=bool(order) and first)

    # -- folder images (popbox migrate) --------------------------------------------------

    async def open_image(self, user: str, folder: str) -> MaildirImageSource:
        """The folder under its lock, with its image (store.image, store.maildir_image)."""
        layout = self._mailboxes.layout(user, folder)
        return await asyncio.to_thread(open_image, self._mailboxes, self._index_cache, layout)

    async def restore_image(self, image: FolderImage, read: ReadBody) -> RestoreReport:
        """Make the folder equal to ``image``, resumably (store.maildir_image)."""
        layout = self._mailboxes.layout(image.user, image.folder)
        return await restore_image(self._mailboxes, self._index_cache, layout, image, read)

    async def remove_folder(self, user: str, folder: str) -> None:
        """Remove the folder and all it holds, under its lock (after a move)."""
        layout = self._mailboxes.layout(user, folder)
        await asyncio.to_thread(remove_folder, self._mailboxes, self._index_cache, layout)

    # -- folders, devices, upkeep -----------------------------------------------------

    async def folders(self, user: str) -> list[str]:
        self._mailboxes.layout(user)  # checks the name
        return await asyncio.to_thread(self._mailboxes.folder_names, user)

    async def devices(self, user: str) -> list[DeviceReport]:
        return await asyncio.to_thread(self._devices_sync, user)

    def _devices_sync(self, user: str) -> list[DeviceReport]:
        with os_errors(f"devices of {user}"):
            return [
                report
                for folder in self._mailboxes.folder_names(user)
                for report in folder_devices(
                    self._mailboxes, self._index_cache, self._mailboxes.layout(user, folder)
                )
            ]

    async def forget_device(self, user: str, device: str) -> int:
        check_device_name(device)
        return await asyncio.to_thread(self._forget_sync, user, device)

    def _forget_sync(self, user: str, device: str) -> int:
        with os_errors(f"forget device {device} of {user}"):
            layouts = [
                self._mailboxes.layout(user, folder)
                for folder in self._mailboxes.folder_names(user)
            ]
            return forget_in_folders(self._mailboxes, layouts, device)

    async def sweep(
        self, user: str, policy: MailboxPolicy, *, now: float | None = None
    ) -> SweepReport:
        when = self._clock() if now is None else now
        return await asyncio.to_thread(self._sweep_sync, user, policy, when)

    def _sweep_sync(self, user: str, policy: MailboxPolicy, now: float) -> SweepReport:
        report = SweepReport()
        failure: StoreError | None = None
        for folder in self._mailboxes.folder_names(user):
            layout = self._mailboxes.layout(user, folder)
            try:
                with os_errors(f"sweep {layout.place.key}"):
                    report.add(sweep_folder(self._mailboxes, self._services, layout, policy, now))
            except StoreError as exc:  # the other folders are still swept
                failure = failure or exc
        if failure is not None:
            raise failure
        return report

    # -- usage --------------------------------------------------------------------

    async def usage(self, user: str) -> Usage:
        self._mailboxes.layout(user)  # checks the name
        return await asyncio.to_thread(self._usage_sync, user)

    def _usage_sync(self, user: str) -> Usage:
        with os_errors(f"usage of {user}"):
            total = Usage(0, 0)
            for folder in self._mailboxes.folder_names(user):
                usage = folder_usage(self._index_cache, self._mailboxes.layout(user, folder))
                total = Usage(total.messages + usage.messages, total.octets + usage.octets)
            return total

    async def close(self) -> None:
        # Nothing to close (no pool, no connection); the cached indexes are only memory.
        self._index_cache.clear()


def _release_abandoned(opening: asyncio.Future[MaildirMaildrop]) -> None:
    """Release the maildrop of an open whose caller was cancelled meanwhile."""
    if opening.cancelled() or opening.exception() is not None:
        return
    opening.result().release_now()
