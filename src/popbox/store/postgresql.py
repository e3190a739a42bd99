"""The PostgreSQL mail store (``storage.backend = "postgresql"``): every node of a
cluster serves every mailbox, the mail and the maildrop leases in one database.

It behaves as the memory store (the reference) and the Maildir store do, on the same
rules (store.devices) and the same numbering as Maildir (store.image): per folder a
UIDVALIDITY and a next UID that only grows, a message's UIDL its kept UIDL or
``image.own_uidl(uidvalidity, uid)``. The tables are in store.postgresql_schema, a
folder claimed and changed in store.postgresql_folders, the session's maildrop in
store.postgresql_maildrop, leases in store.postgresql_lease and folder images (for
moving mailboxes between stores) in store.postgresql_image.

Work is counted in round trips: a login is one statement (the lease, the folder row
and its columns), a QUIT one statement, a delivery of a message up to a chunk one
statement; larger bodies stream into ``mail_chunks`` with COPY, a chunk at a time.
Every driver error becomes StoreError (``-ERR [SYS/TEMP]``, LMTP 451) through
``pgsql.database_errors``; the pool replaces broken connections, so the store
serves again by itself once the database is back.

The pool is opened, and the schema made or upgraded, on first use (once, under a
lock), so the store is built synchronously by the composition root and each worker
process opens its own pool in its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO, Final

from psycopg_pool import AsyncConnectionPool

from popbox.errors import MaildropInUse, NoSuchFolder, StoreError
from popbox.pgsql import PoolSettings, ensure_schema, open_pool
from popbox.store.base import Usage
from popbox.store.devices import FolderState, RemovalPlan, UidSet, plan_removal
from popbox.store.image import FolderImage, ReadBody, RestoreReport
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
from popbox.store.postgresql_deliver import deliver_chunks
from popbox.store.postgresql_folders import (
    ClaimedFolder,
    apply,
    autocommit,
    claim,
    columns_of,
    drop_lease,
)
from popbox.store.postgresql_image import PostgresImageSource, remove_folder, restore_image
from popbox.store.postgresql_lease import Lease, LeaseTerms, new_session
from popbox.store.postgresql_maildrop import PostgresMaildrop
from popbox.store.postgresql_schema import CHUNK_SIZE, SCHEMA

__all__ = ["DUPLICATE_WINDOW", "LEASE_SECONDS", "PostgresStore", "PostgresStoreSettings"]

log = logging.getLogger("popbox.store.postgresql")

# As config_scale.LEASE_SECONDS and DUPLICATE_WINDOW (the reasons are there), for a
# store made in code.
LEASE_SECONDS: Final = 60.0
DUPLICATE_WINDOW: Final = 5 * 86400.0
# Parameters: user.
_USAGE: Final = """
SELECT coalesce(sum(messages), 0)::bigint, coalesce(sum(octets), 0)::bigint
FROM mail_folders WHERE username = %s
"""
_FOLDERS: Final = "SELECT name FROM mail_folders WHERE username = %s"
# Every folder's state and UIDs, for device reports. Parameters: user.
_STATES: Final = """
SELECT f.name, f.uidvalidity, f.state,
    (SELECT string_agg(int8send(uid), ''::bytea ORDER BY uid)
     FROM mail_messages WHERE folder_id = f.id)
FROM mail_folders AS f WHERE f.username = %s AND f.complete
"""
# A login's note in the device state, fenced on the lease. Parameters: state,
# folder id, user, folder, session.
_SAVE_LOGIN: Final = """
UPDATE mail_folders SET state = %s
WHERE id = %s AND EXISTS (
    SELECT 1 FROM mail_leases WHERE username = %s AND folder = %s AND session = %s
        AND expires >= clock_timestamp())
"""
# Delivery ids older than the window are forgotten by the sweep. Parameters: user, cutoff.
_FORGET_DELIVERIES: Final = (
    "DELETE FROM mail_deliveries WHERE username = %s AND delivered < %s"
)


@dataclass(frozen=True, slots=True)
class PostgresStoreSettings:
    """What the store needs of ``[postgresql]`` (config_scale.PostgresSettings)."""

    pool: PoolSettings
    node: str
    lease_seconds: float = LEASE_SECONDS
    duplicate_window: float = DUPLICATE_WINDOW


def visible(
    claimed: ClaimedFolder, excluded: UidSet, recent: array[int] | None
) -> tuple[array[int], array[int]]:
    """The UIDs and sizes a view sees: the folder's (or only the ``recent`` ones)
    without ``excluded``. Slices of the columns when nothing is left out."""
    uids, sizes = claimed.uids, claimed.sizes
    if recent is not None and len(recent) != len(uids):
        wanted = set(recent)
        keep = [i for i, uid in enumerate(uids) if uid in wanted]
        uids = array("q", (uids[i] for i in keep))
        sizes = array("q", (sizes[i] for i in keep))
    slices = list(excluded.slices_in(uids)) if excluded else []
    if not slices:
        return uids, sizes
    out_uids, out_sizes = array("q"), array("q")
    at = 0
    for start, stop in slices:
        out_uids.extend(uids[at:start])
        out_sizes.extend(sizes[at:start])
        at = stop
    out_uids.extend(uids[at:])
    out_sizes.extend(sizes[at:])
    return out_uids, out_sizes


class PostgresStore:
    """Mailboxes in PostgreSQL, shared by every node that names the same database."""

    def __init__(
        self, settings: PostgresStoreSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        """``clock``: the time the store believes it is (arrivals, logins, retention),
        so tests move days forward; leases always run on the database's clock."""
        self._settings = settings
        self._terms = LeaseTerms(settings.node, settings.lease_seconds)
        self._clock = clock
        self._pool: AsyncConnectionPool | None = None
        self._ready = False
        self._opening: asyncio.Lock | None = None

    @property
    def settings(self) -> PostgresStoreSettings:
        return self._settings

    async def pool(self) -> AsyncConnectionPool:
        """The pool, opened and the schema set up on first use; StoreError while the
        database cannot be reached (the next call tries again)."""
        if self._ready and self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                self._pool = await open_pool(self._settings.pool, name="popbox-store")
            if not self._ready:
                await ensure_schema(self._pool, SCHEMA, error=StoreError)
                self._ready = True
        return self._pool

    # -- sessions -----------------------------------------------------------------

    async def open_maildrop(
        self, user: str, view: MailboxView = DEFAULT_VIEW
    ) -> PostgresMaildrop:
        check_device_name(view.device)
        folder = check_folder_name(view.folder)
        pool = await self.pool()
        session = new_session()
        now = self._clock()
        since = now - view.policy.recent_days * DAY if view.recent else None
        async with autocommit(pool, f"open maildrop of {user}") as conn:
            claimed = await claim(
                conn, user, folder, self._terms, session, create=folder == INBOX, since=since
            )
            if claimed is None:
                raise NoSuchFolder(f"{user} has no folder {folder}")
            state = claimed.state
            try:
                if view.inspect:
                    excluded = state.hidden()
                else:
                    holds = not view.recent
                    if state.log_in(view.device, now, holds=holds, policy=view.policy):
                        await conn.execute(
                            _SAVE_LOGIN,
                            (state.to_bytes(), claimed.folder_id, user, folder, session),
                        )
                    excluded = state.excluded_for(view.device)
            except BaseException:
                await drop_lease(conn, user, folder, session)
                raise
        lease = Lease(pool, user, folder, self._terms, session)
        seen = visible(claimed, excluded, claimed.recent)
        return PostgresMaildrop(pool, lease, claimed, seen, view, self._clock)

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
        """Store one message durably (committed before this returns). With a
        ``delivery_id`` a second delivery of it for ``user`` within the duplicate
        window stores nothing and returns the first's key."""
        pieces = (message[at : at + CHUNK_SIZE] for at in range(0, len(message), CHUNK_SIZE))
        return await self._deliver(user, folder, _listed(pieces), uidl, delivery_id)

    async def deliver_file(
        self,
        user: str,
        source: BinaryIO,
        *,
        folder: str = INBOX,
        uidl: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        """Like ``deliver``, streaming the message from ``source`` chunk by chunk."""
        return await self._deliver(user, folder, _read_file(source), uidl, delivery_id)

    async def _deliver(
        self,
        user: str,
        folder: str,
        chunks: AsyncIterator[bytes],
        uidl: str | None,
        delivery_id: str | None,
    ) -> str:
        if uidl is not None:
            check_uidl(uidl)
        name = check_folder_name(folder)
        pool = await self.pool()
        now = self._clock()
        cutoff = now - self._settings.duplicate_window if delivery_id is not None else None
        return await deliver_chunks(
            pool, user, name, chunks, uidl=uidl, delivery_id=delivery_id, now=now, cutoff=cutoff
        )

    # -- folders, devices, upkeep -------------------------------------------------

    async def folders(self, user: str) -> list[str]:
        pool = await self.pool()
        async with autocommit(pool, f"folders of {user}") as conn:
            cursor = await conn.execute(_FOLDERS, (user,))
            names = {row[0] for row in await cursor.fetchall()}
        return [INBOX, *sorted(names - {INBOX})]

    async def devices(self, user: str) -> list[DeviceReport]:
        pool = await self.pool()
        async with autocommit(pool, f"devices of {user}") as conn:
            cursor = await conn.execute(_STATES, (user,))
            rows = await cursor.fetchall()
        by_name = {row[0]: row[1:] for row in rows}
        reports: list[DeviceReport] = []
        for name in [INBOX, *sorted(set(by_name) - {INBOX})]:
            if name not in by_name:
                continue
            uidvalidity, data, uids = by_name[name]
            state = FolderState.from_bytes(bytes(data)) if data else FolderState(uidvalidity)
            ids = columns_of(uids)
            for device, record in sorted(state.devices.items()):
                pending, deleted = state.pending_and_deleted(ids, device)
                last_login, last_hold = record.last_login, record.last_hold
                reports.append(DeviceReport(name, device, last_login, last_hold, pending, deleted))
        return reports

    async def forget_device(self, user: str, device: str) -> int:
        check_device_name(device)
        known = [report.folder for report in await self.devices(user) if report.device == device]
        forgotten = 0
        for folder in dict.fromkeys(known):
            forgotten += await self._change_folder(
                user, folder, lambda claimed: _forget(claimed, device)
            )
        return forgotten

    async def _change_folder(
        self,
        user: str,
        folder: str,
        decide: Callable[[ClaimedFolder], tuple[RemovalPlan, int]],
        *,
        old_before: float | None = None,
    ) -> int:
        """Claim ``folder`` (MaildropInUse if held), let ``decide`` change its state and
        plan its removals, and carry them out; ``decide``'s count, 0 for no folder."""
        pool = await self.pool()
        session = new_session()
        async with autocommit(pool, f"change folder {folder} of {user}") as conn:
            claimed = await claim(
                conn, user, folder, self._terms, session, create=False, old_before=old_before
            )
            if claimed is None:
                return 0
            try:
                plan, count = decide(claimed)
                gone = set(plan.delete) | set(plan.move)
                if gone:
                    claimed.state.prune([uid for uid in claimed.uids if uid not in gone])
                await apply(conn, user, folder, session, claimed, plan, now=self._clock())
            except BaseException:
                await drop_lease(conn, user, folder, session)
                raise
        return count

    async def sweep(
        self, user: str, policy: MailboxPolicy, *, now: float | None = None
    ) -> SweepReport:
        when = self._clock() if now is None else now
        report = SweepReport()
        failure: StoreError | None = None
        for name in await self.folders(user):

            def decide(claimed: ClaimedFolder, name: str = name) -> tuple[RemovalPlan, int]:
                plan = plan_removal(
                    claimed.state,
                    claimed.uids,
                    now=when,
                    folder=name,
                    policy=policy,
                    also=claimed.old or (),
                )
                report.add(SweepReport(len(plan.delete), len(plan.move), plan.hidden))
                return plan, 0

            cutoff = when - policy.trash_days * DAY if name == TRASH else None
            try:
                await self._change_folder(user, name, decide, old_before=cutoff)
            except MaildropInUse:
                report.busy.append(name)
            except StoreError as exc:  # the other folders are still swept
                failure = failure or exc
        await self._forget_deliveries(user, when)
        if failure is not None:
            raise failure
        return report

    async def _forget_deliveries(self, user: str, now: float) -> None:
        pool = await self.pool()
        async with autocommit(pool, f"forget old deliveries of {user}") as conn:
            await conn.execute(_FORGET_DELIVERIES, (user, now - self._settings.duplicate_window))

    # -- usage --------------------------------------------------------------------

    async def usage(self, user: str) -> Usage:
        pool = await self.pool()
        async with autocommit(pool, f"usage of {user}") as conn:
            cursor = await conn.execute(_USAGE, (user,))
            row = await cursor.fetchone()
        assert row is not None
        return Usage(int(row[0]), int(row[1]))

    # -- folder images (store.image) -------------------------------------------------

    async def open_image(self, user: str, folder: str) -> PostgresImageSource:
        name = check_folder_name(folder)
        pool = await self.pool()
        return await PostgresImageSource.open(pool, user, name, self._terms)

    async def restore_image(self, image: FolderImage, read: ReadBody) -> RestoreReport:
        pool = await self.pool()
        return await restore_image(pool, image, read, self._terms)

    async def remove_folder(self, user: str, folder: str) -> None:
        name = check_folder_name(folder)
        pool = await self.pool()
        await remove_folder(pool, user, name, self._terms)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._ready = False
        if pool is not None:
            await pool.close()


def _forget(claimed: ClaimedFolder, device: str) -> tuple[RemovalPlan, int]:
    return RemovalPlan(), int(claimed.state.forget(device))


async def _listed(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def _read_file(source: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(source.read, CHUNK_SIZE):
        yield chunk

