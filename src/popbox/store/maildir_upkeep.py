"""Upkeep of a user's Maildir folders outside sessions: sweeps, device reports, usage.

A sweep takes each folder's lock without waiting (a folder a session holds is skipped
and swept next time), brings its index up to date as a login would, and carries out
what store.devices' rules say may go now: what every holding device deleted, expired
retention, hidden messages whose time is up, and Trash older than its days (counted
from the time in the name, which a move into Trash makes fresh). Device reports and
forgetting a device work on the same state files under the same locks. Everything
here is synchronous and raises OSError or popbox errors; store.maildir runs it in a
worker thread and translates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from popbox.errors import MaildropInUse
from popbox.fileio import FileLock
from popbox.store.base import Usage
from popbox.store.devices import FolderState, StateFormatError, plan_removal
from popbox.store.index import CorruptIndex, MaildirIndex, scan_messages
from popbox.store.index_cache import IndexCache, LoadedIndex
from popbox.store.index_file import index_signature, read_header, read_index
from popbox.store.mailbox import DAY, TRASH, DeviceReport, MailboxPolicy, SweepReport
from popbox.store.maildir_folders import FolderLayout, Mailboxes
from popbox.store.maildir_removal import FolderFiles, carry_out
from popbox.store.maildir_state import read_state, write_state
from popbox.store.maildir_sync import count_usage, estimate_size, header_is_current
from popbox.store.maildir_view import arrivals_of
from popbox.store.maildrop import StoreServices

__all__ = ["folder_devices", "folder_usage", "forget_in_folders", "sweep_folder"]


def sweep_folder(
    mailboxes: Mailboxes,
    services: StoreServices,
    layout: FolderLayout,
    policy: MailboxPolicy,
    now: float,
) -> SweepReport:
    """Remove from one folder what may go at ``now`` under ``policy``."""
    place = layout.place
    if not mailboxes.exists(layout):
        return SweepReport()
    try:
        lock = FileLock(layout.lock)
    except BlockingIOError:
        return SweepReport(busy=[place.folder])
    with lock:
        loaded = _synced(mailboxes, layout, lock)
        loaded_state = loaded.state
        assert loaded_state is not None
        state = loaded_state.state
        columns = loaded.snapshot()[1]
        also: list[int] = []
        if place.folder == TRASH:
            cutoff = now - policy.trash_days * DAY
            arrivals = arrivals_of(columns)
            also = [uid for uid, at in zip(columns.uids, arrivals, strict=True) if at <= cutoff]
        plan = plan_removal(
            state, columns.uids, now=now, folder=place.folder, policy=policy, also=also
        )
        removal = carry_out(
            FolderFiles(layout.maildir, columns),
            loaded.index,
            plan,
            lambda folder: services.destination(place.user, folder),
        )
        kept = loaded
        if removal is not None:
            state.prune(removal.columns.uids)
            kept = LoadedIndex(loaded.index, removal.signature, removal.columns)
            kept.state = loaded_state
        if loaded_state.changed():
            write_state(layout.maildir, loaded_state)
        services.cache.keep(place.key, kept)
        if removal is not None and removal.failure is not None:
            raise removal.failure
    return SweepReport(len(plan.delete), len(plan.move), plan.hidden)


def _synced(mailboxes: Mailboxes, layout: FolderLayout, lock: FileLock) -> LoadedIndex:
    """The locked folder's index brought up to date and its state loaded (and
    written, if the index was rebuilt), as a login would."""
    if not mailboxes.is_known(layout.maildir):
        mailboxes.ensure_maildir(layout.maildir)
    loaded = mailboxes.sync_index(layout, lock)
    if mailboxes.load_state(layout, loaded):
        assert loaded.state is not None
        write_state(layout.maildir, loaded.state)
    return loaded


def folder_devices(
    mailboxes: Mailboxes, cache: IndexCache, layout: FolderLayout
) -> list[DeviceReport]:
    """The devices of one folder, counted on its index brought up to date; from the
    files as they are if a session holds the folder."""
    if not mailboxes.exists(layout):
        return []
    try:
        lock = FileLock(layout.lock)
    except BlockingIOError:
        return _devices_as_stored(cache, layout)
    with lock:
        loaded = _synced(mailboxes, layout, lock)
        assert loaded.state is not None
        reports = _reports(layout.place.folder, loaded.snapshot()[1].uids, loaded.state.state)
        cache.keep(layout.place.key, loaded)
    return reports


def _devices_as_stored(cache: IndexCache, layout: FolderLayout) -> list[DeviceReport]:
    """Device reports from the index and state files without the lock (a session
    holds the folder): both files are only ever replaced whole."""
    cached = cache.peek(layout.place.key)
    index: MaildirIndex | None
    if cached is not None and cached.signature == index_signature(layout.maildir):
        index = cached.index
    else:
        try:
            index = read_index(layout.maildir)
        except CorruptIndex:
            index = None
    uids: Sequence[int] = index.columns().uids if index is not None else []
    uidvalidity = index.uidvalidity if index is not None else 0
    state = read_state(layout.maildir, uidvalidity).state
    if state.uidvalidity != uidvalidity:
        state.rebase(uidvalidity)  # what the next login will do; not written here
    return _reports(layout.place.folder, uids, state)


def _reports(folder: str, uids: Sequence[int], state: FolderState) -> list[DeviceReport]:
    reports = []
    for device, record in sorted(state.devices.items()):
        pending, deleted = state.pending_and_deleted(uids, device)
        reports.append(
            DeviceReport(folder, device, record.last_login, record.last_hold, pending, deleted)
        )
    return reports


def forget_in_folders(mailboxes: Mailboxes, layouts: Sequence[FolderLayout], device: str) -> int:
    """Drop ``device`` from every folder; in how many it was known. Every folder is
    locked first: if a session holds one that knows the device, MaildropInUse and
    nothing changed anywhere."""
    held: list[tuple[FolderLayout, FileLock]] = []
    try:
        for layout in layouts:
            if not mailboxes.exists(layout):
                continue
            try:
                held.append((layout, FileLock(layout.lock)))
            except BlockingIOError:
                try:
                    known = device in read_state(layout.maildir, 0).state.devices
                except StateFormatError:
                    known = True  # cannot tell: do not pretend it was forgotten
                if known:
                    raise MaildropInUse(
                        f"folder {layout.place.folder} of {layout.place.user} is in use; try again"
                    ) from None
        forgotten = 0
        for layout, _ in held:
            loaded = read_state(layout.maildir, 0)
            if loaded.state.forget(device):
                write_state(layout.maildir, loaded)
                forgotten += 1
        return forgotten
    finally:
        for _, lock in held:
            lock.close()


def folder_usage(cache: IndexCache, layout: FolderLayout) -> Usage:
    """Messages and octets in one folder, without its lock: from the index header
    when it covers cur/ exactly, else counted from the listings."""
    maildir = layout.maildir
    try:
        cur_mtime = os.stat(layout.cur).st_mtime_ns
        new_names, _ = scan_messages(layout.new)
    except FileNotFoundError:
        return Usage(0, 0)
    header = read_header(maildir)
    if header is not None and header_is_current(header, cur_mtime):
        # Index totals cover cur/ exactly; new/ holds only unindexed arrivals.
        octets = header.octets + sum(estimate_size(layout.new, name) for name in new_names.values())
        return Usage(header.count + len(new_names), octets)
    cached = cache.peek(layout.place.key)
    if cached is not None and cached.signature == index_signature(maildir):
        return count_usage(maildir, new_names, cached.index)
    try:
        index = read_index(maildir)
    except CorruptIndex:
        index = None
    return count_usage(maildir, new_names, index)
