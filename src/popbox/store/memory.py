"""An in-memory mail store: the reference implementation of the storage contract.

Used by tests and as the model that the Maildir and PostgreSQL stores must match.
Locks are per store instance (one process), which is all an in-memory store can share.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field

from popbox.errors import MaildropInUse, StoreError
from popbox.store.base import MessageInfo, Usage, WireReadyFile
from popbox.wireform import wire_size

__all__ = ["MemoryMaildrop", "MemoryStore"]

# Bodies are handed out in pieces of this size, like a file-backed store would.
CHUNK_SIZE = 64 * 1024


@dataclass
class _Box:
    messages: list[tuple[MessageInfo, bytes]] = field(default_factory=list)
    locked: bool = False


class MemoryMaildrop:
    """A locked view of one in-memory maildrop."""

    def __init__(self, store: MemoryStore, user: str, box: _Box) -> None:
        self._store = store
        self._user = user
        self._box = box
        self._snapshot = list(box.messages)
        self._infos = [info for info, _ in self._snapshot]
        self._released = False

    @property
    def user(self) -> str:
        return self._user

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self._infos

    async def read_message(self, index: int) -> AsyncIterator[bytes]:
        info, data = self._snapshot[index]
        if all(existing is not info for existing, _ in self._box.messages):
            raise StoreError(f"message {info.uidl} vanished")
        for start in range(0, len(data), CHUNK_SIZE):
            yield data[start : start + CHUNK_SIZE]
            await asyncio.sleep(0)

    async def open_wire_ready(self, index: int) -> WireReadyFile | None:
        # Bytes in memory are no file to send: they always go through read_message.
        return None

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        if self._released:
            # The lock is gone (maybe held by another session now): deleting would
            # act outside POP3's UPDATE state.
            raise StoreError(f"maildrop of {self._user} was already released")
        try:
            doomed = {id(self._snapshot[i][0]) for i in indexes}
            self._box.messages = [m for m in self._box.messages if id(m[0]) not in doomed]
        finally:
            await self.release()

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._box.locked = False


class MemoryStore:
    """Mailboxes in a dict. UIDLs come from a per-store counter and never repeat."""

    def __init__(self) -> None:
        self._boxes: dict[str, _Box] = {}
        self._counter = itertools.count(1)

    def _box(self, user: str) -> _Box:
        return self._boxes.setdefault(user, _Box())

    async def open_maildrop(self, user: str) -> MemoryMaildrop:
        box = self._box(user)
        if box.locked:
            raise MaildropInUse(f"maildrop of {user} is locked by another session")
        box.locked = True
        return MemoryMaildrop(self, user, box)

    async def deliver(self, user: str, message: bytes) -> str:
        uidl = f"m{next(self._counter):08d}"
        self._box(user).messages.append((MessageInfo(uidl, wire_size(message)), message))
        return uidl

    async def usage(self, user: str) -> Usage:
        box = self._boxes.get(user)
        if box is None:
            return Usage(0, 0)
        return Usage(len(box.messages), sum(info.size for info, _ in box.messages))

    async def close(self) -> None:
        return None
