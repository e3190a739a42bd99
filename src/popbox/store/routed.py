"""Serving users from two stores while their mailboxes move (``storage.moving_from``).

``MovingStore`` is the store the server uses while ``popbox migrate`` moves mailboxes
from one backend to the other: every call is for one user, and goes where that user's
mail is, by the mark the move keeps in the target (store.moves):

- no mark: the source serves the user (not moved yet);
- "moving": nobody does: a login gets ``-ERR [IN-USE]`` (MaildropInUse) and a
  delivery LMTP 451 (TemporaryDeliveryError), which the MTA retries within minutes,
  so no mail is lost and nobody sees a half-moved mailbox;
- "moved": the target serves the user.

"moved" is final, so it is remembered in memory: a moved user costs one look at the
mark per process. The other states are looked at on every call, which is what makes
a move take effect at once on every node.
"""

from __future__ import annotations

from typing import Final

from popbox.errors import MaildropInUse, TemporaryDeliveryError
from popbox.store.base import Maildrop, MailStore, Usage
from popbox.store.mailbox import (
    DEFAULT_VIEW,
    INBOX,
    DeviceReport,
    MailboxPolicy,
    MailboxView,
    SweepReport,
)
from popbox.store.moves import MoveMarks, MoveState

__all__ = ["MOVED_USERS_KEPT", "MovingStore"]

# Moved users remembered per process; past this many the memory starts afresh (a
# forgotten user only costs one more look at the mark).
MOVED_USERS_KEPT: Final = 100_000


class MovingStore:
    """A MailStore over ``source`` and ``target`` that routes each user by the marks
    ``marks`` of the target (the module's rules)."""

    def __init__(self, source: MailStore, target: MailStore, marks: MoveMarks) -> None:
        self._source = source
        self._target = target
        self._marks = marks
        self._moved: set[str] = set()

    @property
    def source(self) -> MailStore:
        return self._source

    @property
    def target(self) -> MailStore:
        return self._target

    async def _where(self, user: str) -> MoveState:
        if user in self._moved:
            return MoveState.MOVED
        state = await self._marks.state(user)
        if state is MoveState.MOVED:
            if len(self._moved) >= MOVED_USERS_KEPT:
                self._moved.clear()
            self._moved.add(user)
        return state

    async def _store_for(self, user: str) -> MailStore:
        """The store that serves ``user`` now; MaildropInUse while the user moves."""
        state = await self._where(user)
        if state is MoveState.MOVING:
            raise MaildropInUse(f"the mailbox of {user} is being moved; try again shortly")
        return self._target if state is MoveState.MOVED else self._source

    async def open_maildrop(self, user: str, view: MailboxView = DEFAULT_VIEW) -> Maildrop:
        return await (await self._store_for(user)).open_maildrop(user, view)

    async def deliver(
        self,
        user: str,
        message: bytes,
        *,
        folder: str = INBOX,
        uidl: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        state = await self._where(user)
        if state is MoveState.MOVING:
            raise TemporaryDeliveryError(f"the mailbox of {user} is being moved; try again")
        store = self._target if state is MoveState.MOVED else self._source
        return await store.deliver(
            user, message, folder=folder, uidl=uidl, delivery_id=delivery_id
        )

    async def folders(self, user: str) -> list[str]:
        return await (await self._store_for(user)).folders(user)

    async def devices(self, user: str) -> list[DeviceReport]:
        return await (await self._store_for(user)).devices(user)

    async def forget_device(self, user: str, device: str) -> int:
        return await (await self._store_for(user)).forget_device(user, device)

    async def sweep(
        self, user: str, policy: MailboxPolicy, *, now: float | None = None
    ) -> SweepReport:
        state = await self._where(user)
        if state is MoveState.MOVING:
            # A sweep changes nothing while the user moves; the next one catches up.
            return SweepReport(busy=[INBOX])
        store = self._target if state is MoveState.MOVED else self._source
        return await store.sweep(user, policy, now=now)

    async def usage(self, user: str) -> Usage:
        state = await self._where(user)
        # While the user moves, the source is still whole (quota checks, user list).
        store = self._target if state is MoveState.MOVED else self._source
        return await store.usage(user)

    async def close(self) -> None:
        try:
            await self._source.close()
        finally:
            try:
                await self._target.close()
            finally:
                await self._marks.close()
