"""An in-memory mail store: the reference implementation of the storage contract.

Used by tests and as the model that the Maildir and PostgreSQL stores must match:
folders, per-device views and removal per the policy run on the same FolderState
and plans (store.devices) as every other store. Locks are per store instance (one
process), which is all an in-memory store can share. ``clock`` is the time the
store believes it is, so tests move days forward without sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Final

from popbox.errors import MaildropInUse, NoSuchFolder, StoreError
from popbox.store.base import MessageInfo, MessageTable, Usage, WireReadyFile
from popbox.store.devices import FolderState, RemovalPlan, plan_commit, plan_removal
from popbox.store.mailbox import (
    DAY,
    DEFAULT_VIEW,
    INBOX,
    TRASH,
    DeviceReport,
    MailboxPolicy,
    MailboxView,
    SweepReport,
    check_device_name,
    check_folder_name,
    check_uidl,
)
from popbox.wireform import wire_size

__all__ = ["MemoryMaildrop", "MemoryStore"]

log = logging.getLogger(__name__)

# This store's own UIDLs ("m" and the UID in 8 or more digits): a kept UIDL of this
# form could be one the store serves, or will, for another message.
_OWN_UIDL: Final = re.compile(r"m[0-9]{8,}")
# Bodies are handed out in pieces of this size, like a file-backed store would.
CHUNK_SIZE = 64 * 1024


@dataclass(slots=True)
class _Message:
    uid: int
    info: MessageInfo
    data: bytes
    arrived: float


@dataclass
class _Folder:
    messages: list[_Message] = field(default_factory=list)
    state: FolderState = field(default_factory=FolderState)
    locked: bool = False

    def ids(self) -> list[int]:
        return [message.uid for message in self.messages]


class MemoryMaildrop:
    """A locked view of one in-memory folder, as one device sees it."""

    def __init__(
        self,
        store: MemoryStore,
        user: str,
        folder: _Folder,
        view: MailboxView,
        messages: Sequence[_Message],
    ) -> None:
        self._store = store
        self._user = user
        self._folder = folder
        self._view = view
        self._snapshot = list(messages)
        self._table = MessageTable(
            [m.info.uidl for m in self._snapshot], [m.info.size for m in self._snapshot]
        )
        self._retrieved: set[int] = set()
        self._released = False

    @property
    def user(self) -> str:
        return self._user

    @property
    def messages(self) -> MessageTable:
        return self._table

    async def read_message(self, index: int) -> AsyncIterator[bytes]:
        message = self._snapshot[index]
        if all(existing is not message for existing in self._folder.messages):
            raise StoreError(f"message {message.info.uidl} vanished")
        data = message.data
        for start in range(0, len(data), CHUNK_SIZE):
            yield data[start : start + CHUNK_SIZE]
            await asyncio.sleep(0)

    async def open_wire_ready(self, index: int) -> WireReadyFile | None:
        # Bytes in memory are no file to send: they always go through read_message.
        return None

    def mark_retrieved(self, index: int) -> None:
        self._retrieved.add(index)

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        if self._released:
            # The lock is gone (maybe held by another session now): deleting would
            # act outside POP3's UPDATE state.
            raise StoreError(f"maildrop of {self._user} was already released")
        if self._view.inspect:
            await self.release()
            raise StoreError("an inspecting view cannot delete messages")
        try:
            doomed = [self._snapshot[i].uid for i in indexes]
            view = self._view
            folder = self._folder
            plan = plan_commit(
                folder.state,
                folder.ids(),
                device=view.device,
                deleted=doomed,
                retrieved=[self._snapshot[i].uid for i in self._retrieved],
                now=self._store.now(),
                folder=view.folder,
                policy=view.policy,
            )
            self._store.carry_out(self._user, folder, plan)
        finally:
            await self.release()

    async def release(self) -> None:
        if not self._released:
            self._released = True
            policy = self._view.policy
            if self._retrieved and policy.retention_days is not None:
                ids = [self._snapshot[i].uid for i in self._retrieved]
                self._folder.state.record_retrievals(ids, self._store.now())
            self._folder.locked = False


class MemoryStore:
    """Mailboxes in a dict. UIDLs come from a per-store counter and never repeat."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        duplicate_window: float = 0.0,
    ) -> None:
        """``duplicate_window``: for how many seconds a delivery id is recognised
        (``deliver(delivery_id=)``, as the PostgreSQL store's ``[postgresql]
        duplicate_window``). 0, the default, recognises none: tests deliver the same
        bytes twice on purpose, and ask for a window when retries are the subject."""
        self._mailboxes: dict[str, dict[str, _Folder]] = {}
        self._counter = itertools.count(1)
        self._clock = clock
        self._duplicate_window = duplicate_window
        # (user, delivery id) -> (key, when delivered)
        self._deliveries: dict[tuple[str, str], tuple[str, float]] = {}

    def now(self) -> float:
        return self._clock()

    def _folder(self, user: str, folder: str, *, create: bool) -> _Folder:
        folders = self._mailboxes.setdefault(user, {})
        name = check_folder_name(folder)
        found = folders.get(name)
        if found is None:
            if not create:
                raise NoSuchFolder(f"{user} has no folder {name}")
            found = folders[name] = _Folder()
        return found

    async def open_maildrop(self, user: str, view: MailboxView = DEFAULT_VIEW) -> MemoryMaildrop:
        check_device_name(view.device)
        folder = self._folder(user, view.folder, create=view.folder == INBOX)
        if folder.locked:
            raise MaildropInUse(f"maildrop of {user} is locked by another session")
        now = self.now()
        if view.inspect:
            excluded = folder.state.hidden()
        else:
            folder.state.log_in(view.device, now, holds=not view.recent, policy=view.policy)
            excluded = folder.state.excluded_for(view.device)
        folder.locked = True
        since = now - view.policy.recent_days * DAY if view.recent else None
        visible = [
            m
            for m in folder.messages
            if m.uid not in excluded and (since is None or m.arrived >= since)
        ]
        return MemoryMaildrop(self, user, folder, view, visible)

    def carry_out(self, user: str, folder: _Folder, plan: RemovalPlan) -> None:
        """Remove what ``plan`` says from ``folder``, moving to its target if any."""
        doomed = set(plan.delete) | set(plan.move)
        moving = set(plan.move)
        if plan.target is not None and moving:
            target = self._folder(user, plan.target, create=True)
            now = self.now()
            for message in folder.messages:
                if message.uid in moving:
                    target.messages.append(self._stored(message.data, now))
        folder.messages = [m for m in folder.messages if m.uid not in doomed]
        folder.state.prune(folder.ids())

    def _stored(self, message: bytes, arrived: float, uidl: str | None = None) -> _Message:
        uid = next(self._counter)
        return _Message(
            uid, MessageInfo(uidl or f"m{uid:08d}", wire_size(message)), message, arrived
        )

    async def deliver(
        self,
        user: str,
        message: bytes,
        *,
        folder: str = INBOX,
        uidl: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        if uidl is not None:
            check_uidl(uidl)
        target = self._folder(user, folder, create=True)
        now = self.now()
        if delivery_id is not None:
            seen = self._deliveries.get((user, delivery_id))
            if seen is not None and seen[1] > now - self._duplicate_window:
                log.info(
                    "delivery %s to %s was stored before as %s; not stored again",
                    delivery_id,
                    user,
                    seen[0],
                )
                return seen[0]
        if uidl is not None and (
            _OWN_UIDL.fullmatch(uidl) or any(m.info.uidl == uidl for m in target.messages)
        ):
            # The rule of every store (base.MailStore.deliver): a UIDL the folder
            # serves already, or one in the store's own form, is not served twice.
            log.warning(
                "folder %s of %s: kept UIDL %s is served already or in popbox's own "
                "form; the message gets popbox's own UIDL",
                folder,
                user,
                uidl,
            )
            uidl = None
        stored = self._stored(message, now, uidl)
        target.messages.append(stored)
        if delivery_id is not None:
            self._deliveries[user, delivery_id] = (stored.info.uidl, now)
        return stored.info.uidl

    async def folders(self, user: str) -> list[str]:
        names = set(self._mailboxes.get(user, {})) | {INBOX}
        return [INBOX, *sorted(names - {INBOX})]

    async def devices(self, user: str) -> list[DeviceReport]:
        reports: list[DeviceReport] = []
        for name in await self.folders(user):
            folder = self._mailboxes.get(user, {}).get(name)
            if folder is None:
                continue
            ids = folder.ids()
            for device, record in sorted(folder.state.devices.items()):
                pending, deleted = folder.state.pending_and_deleted(ids, device)
                last_login, last_hold = record.last_login, record.last_hold
                reports.append(DeviceReport(name, device, last_login, last_hold, pending, deleted))
        return reports

    async def forget_device(self, user: str, device: str) -> int:
        check_device_name(device)
        folders = self._mailboxes.get(user, {})
        if any(folder.locked and device in folder.state.devices for folder in folders.values()):
            raise MaildropInUse(f"a folder of {user} is in use; try again")
        return sum(folder.state.forget(device) for folder in folders.values())

    async def sweep(
        self, user: str, policy: MailboxPolicy, *, now: float | None = None
    ) -> SweepReport:
        when = self.now() if now is None else now
        report = SweepReport()
        for name, folder in list(self._mailboxes.get(user, {}).items()):
            if folder.locked:
                report.busy.append(name)
                continue
            also: list[int] = []
            if name == TRASH:
                cutoff = when - policy.trash_days * DAY
                also = [m.uid for m in folder.messages if m.arrived <= cutoff]
            plan = plan_removal(
                folder.state, folder.ids(), now=when, folder=name, policy=policy, also=also
            )
            self.carry_out(user, folder, plan)
            report.add(SweepReport(len(plan.delete), len(plan.move), plan.hidden))
        return report

    async def usage(self, user: str) -> Usage:
        messages = [m for f in self._mailboxes.get(user, {}).values() for m in f.messages]
        return Usage(len(messages), sum(m.info.size for m in messages))

    async def close(self) -> None:
        return None
