"""Maildrop leases in PostgreSQL: a folder held by one session, on any node, for a while.

A lease is a row of ``mail_leases`` keyed by user and folder, naming the node and a
random session id, with an expiry in the database's clock (``clock_timestamp()``;
the nodes' clocks never count). It is taken with one upsert that only overwrites an
expired row, so a second open anywhere finds it live and gets ``[IN-USE]``, and a
node that died without releasing frees its folders once its leases run out.

Not a session advisory lock: such a lock lives as long as one connection, and a
session holds a pooled connection only while a statement runs. A ``Lease`` instead
renews itself every third of its length from a task of its own while the maildrop
is open; a renewal that finds the row gone or taken marks it lost. Every change made
under a lease is fenced: its transaction first checks, with the row locked, that the
lease is still this session's and unexpired (``fence``), so a session whose lease
ran out (a node paused past its lease) deletes nothing.

Sweeps, ``forget_device`` and a restore's small steps take the lease inside their own
transaction (``TAKE`` then ``DROP`` before the commit): the row then acts as a lock
for the transaction's length, and whoever else wants the folder meanwhile waits for
the commit or finds it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import weakref
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from popbox.errors import MaildropInUse, StoreError
from popbox.pgsql import database_errors, transaction

__all__ = ["DROP", "TAKE", "Lease", "LeaseTerms", "fence", "take"]

log = logging.getLogger("popbox.store.postgresql")

# Take the lease of (user, folder) unless someone holds it unexpired; returns the row
# only when taken. Parameters: user, folder, node, session, seconds.
TAKE: Final = """
INSERT INTO mail_leases AS l (username, folder, node, session, expires)
VALUES (%s, %s, %s, %s, clock_timestamp() + make_interval(secs => %s))
ON CONFLICT (username, folder) DO UPDATE
    SET node = EXCLUDED.node, session = EXCLUDED.session, expires = EXCLUDED.expires
    WHERE l.expires < clock_timestamp()
RETURNING l.session
"""
# Who holds it, for the refusal's message. Parameters: user, folder.
_HOLDER: Final = "SELECT node FROM mail_leases WHERE username = %s AND folder = %s"
# Parameters: seconds, user, folder, session.
_RENEW: Final = """
UPDATE mail_leases SET expires = clock_timestamp() + make_interval(secs => %s)
WHERE username = %s AND folder = %s AND session = %s AND expires >= clock_timestamp()
"""
# Parameters: user, folder, session.
DROP: Final = "DELETE FROM mail_leases WHERE username = %s AND folder = %s AND session = %s"
_FENCE: Final = """
SELECT 1 FROM mail_leases
WHERE username = %s AND folder = %s AND session = %s AND expires >= clock_timestamp()
FOR UPDATE
"""
# A renewal comes every third of the lease: two may fail (a database failover) before
# the lease runs out.
RENEWALS_PER_LEASE: Final = 3


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """Who takes leases and for how long (config_scale.PostgresSettings)."""

    node: str
    seconds: float


def new_session() -> str:
    """A session id: random, so two sessions of one node never share a lease."""
    return secrets.token_hex(8)


async def take(
    conn: psycopg.AsyncConnection, user: str, folder: str, terms: LeaseTerms, session: str
) -> None:
    """Take the lease inside ``conn``'s transaction; MaildropInUse if it is held."""
    cursor = await conn.execute(TAKE, (user, folder, terms.node, session, terms.seconds))
    if await cursor.fetchone() is None:
        cursor = await conn.execute(_HOLDER, (user, folder))
        row = await cursor.fetchone()
        holder = f" (held by {row[0]})" if row else ""
        raise MaildropInUse(f"folder {folder} of {user} is in use{holder}")


async def fence(conn: psycopg.AsyncConnection, user: str, folder: str, session: str) -> None:
    """Inside ``conn``'s transaction: StoreError unless the lease is still ours and
    live; the row stays locked until the commit, so it cannot run out meanwhile."""
    cursor = await conn.execute(_FENCE, (user, folder, session))
    if await cursor.fetchone() is None:
        raise StoreError(f"the lease of folder {folder} of {user} ran out; nothing changed")


class Lease:
    """A lease taken and committed, renewed in the background until ``stop``."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        user: str,
        folder: str,
        terms: LeaseTerms,
        session: str,
    ) -> None:
        self.user = user
        self.folder = folder
        self.session = session
        self.lost = False
        self._pool = pool
        self._terms = terms
        self._owner: weakref.ref[object] | None = None
        self._renewer: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._renew_forever(), name=f"lease {user}/{folder}"
        )

    def belongs_to(self, owner: object) -> None:
        """Renew only while ``owner`` (the maildrop) lives: one dropped without a
        release (a bug) frees its folder within a lease instead of holding it."""
        self._owner = weakref.ref(owner)

    async def _renew_forever(self) -> None:
        period = self._terms.seconds / RENEWALS_PER_LEASE
        while True:
            await asyncio.sleep(period)
            if self._owner is not None and self._owner() is None:
                log.warning("folder %s of %s: maildrop never released", self.folder, self.user)
                return
            try:
                with database_errors(StoreError, "renew a maildrop lease"):
                    async with self._pool.connection() as conn:
                        cursor = await conn.execute(
                            _RENEW, (self._terms.seconds, self.user, self.folder, self.session)
                        )
                        renewed = cursor.rowcount == 1
            except StoreError as exc:
                # The next renewal tries again; the commit's fence decides in the end.
                log.warning("folder %s of %s: %s", self.folder, self.user, exc)
                continue
            if not renewed:
                self.lost = True
                log.warning(
                    "folder %s of %s: the maildrop lease ran out and was lost",
                    self.folder,
                    self.user,
                )
                return

    async def stop(self) -> None:
        """Stop renewing (the lease row is left for the caller to drop or let run out)."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def release(self) -> None:
        """Stop renewing and drop the row; a failure is logged (the lease runs out)."""
        await self.stop()
        try:
            async with transaction(self._pool, StoreError, "release a maildrop lease") as conn:
                await conn.execute(DROP, (self.user, self.folder, self.session))
        except StoreError as exc:
            log.warning(
                "folder %s of %s: %s; the lease runs out by itself", self.folder, self.user, exc
            )
