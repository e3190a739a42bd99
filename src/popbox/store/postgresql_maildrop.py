"""One folder of the PostgreSQL store held by one session, as one device sees it.

The maildrop holds the folder's lease (store.postgresql_lease), renewed in the
background, and the columns its login read; it holds no database connection between
statements, so a few pooled connections serve thousands of sessions. Bodies are read
a few chunks per statement (``CHUNKS_PER_READ``), each statement on a connection
taken for it alone, so a slow client never keeps a connection from the others.
QUIT's commit is one statement fenced on the lease (store.postgresql_folders.apply).
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import AsyncIterator, Callable, Collection
from typing import Final

from psycopg_pool import AsyncConnectionPool

from popbox.errors import StoreError
from popbox.store.base import MessageTable, WireReadyFile
from popbox.store.devices import RemovalPlan, plan_commit
from popbox.store.mailbox import MailboxView
from popbox.store.postgresql_folders import ClaimedFolder, apply, autocommit
from popbox.store.postgresql_lease import Lease

__all__ = ["CHUNKS_PER_READ", "PostgresMaildrop", "read_body"]

log = logging.getLogger("popbox.store.postgresql")

# Chunks (postgresql_schema.CHUNK_SIZE each) fetched per statement while a body
# streams: 1 MiB in memory at most, and a 200 MB message in 200 statements.
CHUNKS_PER_READ: Final = 4
# The first piece of a body, with whether the message exists at all (an empty
# message has no chunks). Parameters: folder id, uid, count.
_FIRST_CHUNKS: Final = """
SELECT m.id, c.data FROM mail_messages AS m
LEFT JOIN LATERAL (
    SELECT data, seq FROM mail_chunks WHERE message_id = m.id ORDER BY seq LIMIT %s
) AS c ON true
WHERE m.folder_id = %s AND m.uid = %s
ORDER BY c.seq
"""
# Parameters: message id, first seq, count.
_MORE_CHUNKS: Final = """
SELECT data FROM mail_chunks WHERE message_id = %s AND seq >= %s ORDER BY seq LIMIT %s
"""


async def read_body(
    pool: AsyncConnectionPool, folder_id: int, uid: int, name: str
) -> AsyncIterator[bytes]:
    """The stored bytes of message ``uid`` of the folder, a few chunks per statement;
    StoreError (naming ``name``) if it is gone."""
    async with autocommit(pool, f"read message {name}") as conn:
        cursor = await conn.execute(_FIRST_CHUNKS, (CHUNKS_PER_READ, folder_id, uid))
        rows = await cursor.fetchall()
    if not rows:
        raise StoreError(f"message {name} vanished")
    message_id = rows[0][0]
    chunks = [bytes(data) for _, data in rows if data is not None]
    seq = 0
    while chunks:
        for chunk in chunks:
            yield chunk
        if len(chunks) < CHUNKS_PER_READ:
            return
        seq += len(chunks)
        async with autocommit(pool, f"read message {name}") as conn:
            cursor = await conn.execute(_MORE_CHUNKS, (message_id, seq, CHUNKS_PER_READ))
            chunks = [bytes(row[0]) for row in await cursor.fetchall()]


class PostgresMaildrop:
    """A leased view of one PostgreSQL folder, as one device sees it."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        lease: Lease,
        claimed: ClaimedFolder,
        visible: tuple[array[int], array[int]],
        view: MailboxView,
        clock: Callable[[], float],
    ) -> None:
        """``visible``: the UIDs and sizes the view sees (store.postgresql.visible)."""
        self._pool = pool
        self._lease = lease
        lease.belongs_to(self)
        self._claimed = claimed
        self._uids, sizes = visible
        self._view = view
        self._clock = clock
        self._table = MessageTable(claimed.uidl_column(self._uids), sizes, uidls_checked=True)
        self._retrieved: set[int] = set()
        self._released = False

    @property
    def user(self) -> str:
        return self._lease.user

    @property
    def messages(self) -> MessageTable:
        return self._table

    def read_message(self, index: int) -> AsyncIterator[bytes]:
        return read_body(
            self._pool, self._claimed.folder_id, self._uids[index], self._table.uidls[index]
        )

    async def open_wire_ready(self, index: int) -> WireReadyFile | None:
        # No file to send: the bytes come from the database through read_message.
        return None

    def mark_retrieved(self, index: int) -> None:
        self._retrieved.add(index)

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        if self._released:
            raise StoreError(f"maildrop of {self.user} was already released")
        if self._view.inspect:
            await self.release()
            raise StoreError("an inspecting view cannot delete messages")
        self._released = True
        lease, claimed, view = self._lease, self._claimed, self._view
        await lease.stop()
        try:
            now = self._clock()
            plan = plan_commit(
                claimed.state,
                claimed.uids,
                device=view.device,
                deleted=[self._uids[i] for i in indexes],
                retrieved=[self._uids[i] for i in self._retrieved],
                now=now,
                folder=view.folder,
                policy=view.policy,
            )
            await self._save(plan, now)
        except BaseException:
            await lease.release()
            raise

    async def _save(self, plan: RemovalPlan, now: float) -> None:
        claimed, lease = self._claimed, self._lease
        gone = set(plan.delete) | set(plan.move)
        claimed.state.prune([uid for uid in claimed.uids if uid not in gone])
        async with autocommit(self._pool, f"commit deletions of {lease.user}") as conn:
            await apply(conn, lease.user, lease.folder, lease.session, claimed, plan, now=now)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        policy = self._view.policy
        if self._retrieved and policy.retention_days is not None and not self._view.inspect:
            # The first retrievals count for the retention: saved with the release.
            await self._lease.stop()
            self._claimed.state.record_retrievals(
                [self._uids[i] for i in self._retrieved], self._clock()
            )
            try:
                await self._save(RemovalPlan(), self._clock())
                return
            except StoreError as exc:
                log.warning("maildrop of %s: retrievals not noted: %s", self.user, exc)
        await self._lease.release()
