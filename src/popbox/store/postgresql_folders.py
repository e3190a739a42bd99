"""One folder of the PostgreSQL store claimed and changed: the two statements every
session, sweep and device change runs (store.postgresql_schema has the tables).

``claim`` takes the folder's lease and reads the folder in ONE statement: its row,
its device state and its messages as columns (UIDs and sizes as the binary
``int8send`` of each, joined into one ``bytea``, read into arrays: a login on
100,000 messages makes no per-message Python object). ``apply`` carries out what
the mailbox rules decided (store.devices) in ONE statement too: the deletions, the
moves to Trash or Archive, the new state and the counters, fenced on the lease
(store.postgresql_lease), which it drops. Both run outside an explicit transaction:
one statement is one transaction, and one round trip.
"""

from __future__ import annotations

import bisect
import contextlib
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from popbox import pgsql
from popbox.errors import MaildropInUse, StoreError
from popbox.store.devices import FolderState, RemovalPlan
from popbox.store.index import KeptUidlColumn, UidlColumn
from popbox.store.postgresql_lease import LeaseTerms

__all__ = ["ClaimedFolder", "apply", "autocommit", "claim", "columns_of", "drop_lease"]

# The lease, then the folder and its columns, only read when the lease was taken.
# Parameters: user, folder, node, session, seconds, user, folder, user, folder,
# since, old_before.
_CLAIM: Final = """
WITH lease AS (
    INSERT INTO mail_leases AS l (username, folder, node, session, expires)
    VALUES (%s, %s, %s, %s, clock_timestamp() + make_interval(secs => %s))
    ON CONFLICT (username, folder) DO UPDATE
        SET node = EXCLUDED.node, session = EXCLUDED.session, expires = EXCLUDED.expires
        WHERE l.expires < clock_timestamp()
    RETURNING 1
), f AS (
    SELECT id, uidvalidity, next_uid, state, complete
    FROM mail_folders WHERE username = %s AND name = %s
)
SELECT EXISTS (SELECT 1 FROM lease), f.id, f.uidvalidity, f.next_uid, f.state, f.complete,
    c.uids, c.sizes, c.recent, c.old, c.kept_uids, c.kept_uidls,
    (SELECT node FROM mail_leases WHERE username = %s AND folder = %s)
FROM (SELECT 1) AS one
LEFT JOIN f ON true
LEFT JOIN LATERAL (
    SELECT string_agg(int8send(m.uid), ''::bytea ORDER BY m.uid) AS uids,
        string_agg(int8send(m.size), ''::bytea ORDER BY m.uid) AS sizes,
        string_agg(int8send(m.uid), ''::bytea ORDER BY m.uid)
            FILTER (WHERE m.arrived >= %s) AS recent,
        string_agg(int8send(m.uid), ''::bytea ORDER BY m.uid)
            FILTER (WHERE m.arrived <= %s) AS old,
        array_agg(m.uid ORDER BY m.uid) FILTER (WHERE m.kept_uidl IS NOT NULL) AS kept_uids,
        array_agg(m.kept_uidl ORDER BY m.uid)
            FILTER (WHERE m.kept_uidl IS NOT NULL) AS kept_uidls
    FROM mail_messages AS m
    WHERE m.folder_id = f.id AND EXISTS (SELECT 1 FROM lease)
) AS c ON true
"""
# Make the INBOX a user logs in to for the first time. Parameters: user.
_MAKE_INBOX: Final = """
INSERT INTO mail_folders (username, name) VALUES (%s, 'INBOX')
ON CONFLICT (username, name) DO UPDATE SET name = EXCLUDED.name
RETURNING id, uidvalidity, next_uid, state, complete
"""
# Everything a commit or a sweep changes, fenced on the lease, which it drops; the
# last column says whether the lease was still ours (nothing changed otherwise).
_APPLY: Final = """
WITH fence AS (
    SELECT 1 FROM mail_leases
    WHERE username = %(user)s AND folder = %(folder)s AND session = %(session)s
        AND expires >= clock_timestamp()
    FOR UPDATE
), gone AS (
    DELETE FROM mail_messages
    WHERE folder_id = %(id)s AND uid = ANY(%(delete)s::bigint[])
        AND EXISTS (SELECT 1 FROM fence)
), target AS (
    INSERT INTO mail_folders AS t (username, name, next_uid, messages, octets)
    SELECT %(user)s, %(target)s, 1 + %(moved)s::bigint, %(moved)s::bigint,
        %(moved_octets)s::bigint
    FROM fence WHERE %(moved)s::bigint > 0
    ON CONFLICT (username, name) DO UPDATE
        SET next_uid = t.next_uid + EXCLUDED.messages,
            messages = t.messages + EXCLUDED.messages, octets = t.octets + EXCLUDED.octets
    RETURNING t.id, t.next_uid - %(moved)s::bigint AS first
), moved AS (
    UPDATE mail_messages AS m
    SET folder_id = target.id, uid = target.first + o.n - 1, arrived = %(now)s,
        kept_uidl = NULL
    FROM target, unnest(%(move)s::bigint[]) WITH ORDINALITY AS o (uid, n)
    WHERE m.folder_id = %(id)s AND m.uid = o.uid
), source AS (
    UPDATE mail_folders
    SET state = %(state)s, messages = messages - %(removed)s::bigint,
        octets = octets - %(removed_octets)s::bigint
    WHERE id = %(id)s AND EXISTS (SELECT 1 FROM fence)
), dropped AS (
    DELETE FROM mail_leases
    WHERE username = %(user)s AND folder = %(folder)s AND session = %(session)s
        AND EXISTS (SELECT 1 FROM fence)
)
SELECT EXISTS (SELECT 1 FROM fence)
"""
_DROP: Final = "DELETE FROM mail_leases WHERE username = %s AND folder = %s AND session = %s"
_BIG_ENDIAN: Final = sys.byteorder == "big"


def autocommit(
    pool: AsyncConnectionPool, doing: str
) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection]:
    """A pooled connection whose every statement is its own transaction
    (popbox.pgsql.autocommit); driver errors become StoreError."""
    return pgsql.autocommit(pool, StoreError, doing)


def columns_of(data: bytes | None) -> array[int]:
    """The int8 values ``string_agg(int8send(...))`` joined, as an array."""
    values = array("q")
    if data:
        values.frombytes(data)
        if not _BIG_ENDIAN:
            values.byteswap()
    return values


@dataclass(slots=True)
class ClaimedFolder:
    """A folder read under its lease: the numbering, the state, the message columns."""

    folder_id: int
    uidvalidity: int
    next_uid: int
    state: FolderState
    uids: array[int]
    """Every message's UID, ascending."""
    sizes: array[int]
    """Their wire sizes."""
    recent: array[int] | None
    """The UIDs that arrived at or after ``since`` (None: not asked)."""
    old: array[int] | None
    """The UIDs that arrived at or before ``old_before`` (None: not asked)."""
    kept: dict[int, str] = field(default_factory=dict)
    """Kept UIDLs by UID."""

    def uidl_column(self, uids: Sequence[int]) -> UidlColumn | KeptUidlColumn:
        """The UIDLs of ``uids``: the templated column unless some keeps a UIDL."""
        template = f"{self.uidvalidity:08x}%08x"  # image.own_uidl, as a template
        if self.kept and not self.kept.keys().isdisjoint(uids):
            return KeptUidlColumn(template, uids, self.kept)
        return UidlColumn(template, uids)

    def octets_of(self, uids: Sequence[int]) -> int:
        """The wire octets of those of ``uids`` the folder holds."""
        total = 0
        for uid in uids:
            at = bisect.bisect_left(self.uids, uid)
            if at < len(self.uids) and self.uids[at] == uid:
                total += self.sizes[at]
        return total


async def claim(
    conn: psycopg.AsyncConnection,
    user: str,
    folder: str,
    terms: LeaseTerms,
    session: str,
    *,
    create: bool,
    since: float | None = None,
    old_before: float | None = None,
) -> ClaimedFolder | None:
    """Take the lease of the folder and read it (one statement, committed); None if the
    folder does not exist and ``create`` is false, with no lease left behind.
    MaildropInUse if held, StoreError for a folder a restore has not finished."""
    lease = (user, folder, terms.node, session, terms.seconds)
    params = (*lease, user, folder, user, folder, since, old_before)
    cursor = await conn.execute(_CLAIM, params, prepare=True)
    row = await cursor.fetchone()
    assert row is not None
    leased, folder_id, uidvalidity, next_uid, state, complete = row[:6]
    uids, sizes, recent, old, kept_uids, kept_uidls, holder = row[6:]
    if not leased:
        where = f" (held by {holder})" if holder else ""
        raise MaildropInUse(f"folder {folder} of {user} is in use{where}")
    if folder_id is None:
        if not create:
            await drop_lease(conn, user, folder, session)
            return None
        cursor = await conn.execute(_MAKE_INBOX, (user,))
        made = await cursor.fetchone()
        assert made is not None
        folder_id, uidvalidity, next_uid, state, complete = made
    if not complete:
        await drop_lease(conn, user, folder, session)
        raise StoreError(f"folder {folder} of {user} is being moved here; try again later")
    try:
        loaded = FolderState.from_bytes(bytes(state)) if state else FolderState(uidvalidity)
    except BaseException:
        await drop_lease(conn, user, folder, session)
        raise
    return ClaimedFolder(
        folder_id=folder_id,
        uidvalidity=uidvalidity,
        next_uid=next_uid,
        state=loaded,
        uids=columns_of(uids),
        sizes=columns_of(sizes),
        recent=columns_of(recent) if since is not None else None,
        old=columns_of(old) if old_before is not None else None,
        kept=dict(zip(kept_uids or (), kept_uidls or (), strict=True)),
    )


async def drop_lease(conn: psycopg.AsyncConnection, user: str, folder: str, session: str) -> None:
    await conn.execute(_DROP, (user, folder, session))


async def apply(
    conn: psycopg.AsyncConnection,
    user: str,
    folder: str,
    session: str,
    claimed: ClaimedFolder,
    plan: RemovalPlan,
    *,
    now: float,
) -> None:
    """Carry out ``plan`` on the claimed folder, save its state and drop the lease,
    in one statement; StoreError (nothing changed) if the lease is no longer ours."""
    move = plan.move if plan.target is not None else []
    moved_octets = claimed.octets_of(move)
    params = {
        "user": user,
        "folder": folder,
        "session": session,
        "id": claimed.folder_id,
        "delete": list(plan.delete),
        "target": plan.target or "",
        "moved": len(move),
        "moved_octets": moved_octets,
        "now": now,
        "move": list(move),
        "state": claimed.state.to_bytes(),
        "removed": len(plan.delete) + len(move),
        "removed_octets": claimed.octets_of(plan.delete) + moved_octets,
    }
    cursor = await conn.execute(_APPLY, params, prepare=True)
    row = await cursor.fetchone()
    if row is None or not row[0]:
        raise StoreError(f"the lease of folder {folder} of {user} ran out; nothing changed")
