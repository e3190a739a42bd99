"""Delivery into the PostgreSQL store: committed before it returns, recognised when
an MTA delivers the same message again.

A message of one chunk (most mail) is stored by ONE statement: the folder's next UID
and counters, the message row, its body and the delivery id's record. A larger one,
or one that keeps a UIDL, is one transaction: its body streams in with COPY first,
a chunk (postgresql_schema.CHUNK_SIZE) at a time and its wire size counted on the
way, and only then are the folder row (locked for its next UID until the commit),
the message row and the record written, so deliveries to one folder wait for each
other only for those last statements.

A delivery id (``deliver(delivery_id=)``, made by delivery.deliverer from the message
as received) recorded less than the duplicate window ago means the same message was
stored already, and its key is returned with nothing stored: an MTA that retries
after a lost reply makes no second copy. Two deliveries of one id at the very same
moment (a retry while the first is still being stored) may both store; an MTA
retries after minutes, long after the first committed.

A kept UIDL follows base.MailStore.deliver's rule: the folder row is locked when the
UIDL is checked, so of two deliveries with one UIDL the first (the lower UID) keeps
it; a UIDL the folder serves already or in its own form is refused with a WARNING.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from popbox.errors import StoreError
from popbox.pgsql import transaction
from popbox.store.image import own_uidl
from popbox.store.maildir_uidls import is_own_form
from popbox.store.postgresql_folders import autocommit
from popbox.wireform import WireSizeCounter, wire_size

__all__ = ["deliver_chunks"]

log = logging.getLogger("popbox.store.postgresql")

_ONE_STATEMENT: Final = """
WITH dup AS (
    SELECT key FROM mail_deliveries
    WHERE username = %(user)s AND delivery_id = %(id)s AND delivered > %(cutoff)s
), f AS (
    INSERT INTO mail_folders AS f (username, name, next_uid, messages, octets)
    SELECT %(user)s, %(folder)s, 2, 1, %(size)s::bigint WHERE NOT EXISTS (SELECT 1 FROM dup)
    ON CONFLICT (username, name) DO UPDATE
        SET next_uid = f.next_uid + 1, messages = f.messages + 1,
            octets = f.octets + EXCLUDED.octets
    RETURNING f.id, f.next_uid - 1 AS uid, f.uidvalidity
), m AS (
    INSERT INTO mail_messages (folder_id, uid, size, stored, arrived)
    SELECT id, uid, %(size)s::bigint, %(stored)s::bigint, %(arrived)s FROM f
    RETURNING id
), c AS (
    INSERT INTO mail_chunks (message_id, seq, data)
    SELECT id, 0, %(data)s FROM m WHERE %(stored)s::bigint > 0
), k AS (
    -- The key: the message's UIDL in popbox's own form (image.own_uidl).
    SELECT lpad(to_hex(uidvalidity), greatest(8, length(to_hex(uidvalidity))), '0')
        || lpad(to_hex(uid), greatest(8, length(to_hex(uid))), '0') AS key
    FROM f
), r AS (
    INSERT INTO mail_deliveries (username, delivery_id, key, delivered)
    SELECT %(user)s, %(id)s, key, %(arrived)s FROM k WHERE %(id)s IS NOT NULL
    ON CONFLICT (username, delivery_id) DO UPDATE
        SET key = EXCLUDED.key, delivered = EXCLUDED.delivered
)
SELECT (SELECT key FROM dup), (SELECT key FROM k)
"""
# Parameters: user, delivery id, cutoff.
_DUPLICATE: Final = """
SELECT key FROM mail_deliveries WHERE username = %s AND delivery_id = %s AND delivered > %s
"""
_NEW_ID: Final = "SELECT nextval(pg_get_serial_sequence('mail_messages', 'id'))"
_COPY: Final = "COPY mail_chunks (message_id, seq, data) FROM STDIN (FORMAT BINARY)"
# Parameters: user, folder, octets.
_NEXT_UID: Final = """
INSERT INTO mail_folders AS f (username, name, next_uid, messages, octets)
VALUES (%s, %s, 2, 1, %s::bigint)
ON CONFLICT (username, name) DO UPDATE
    SET next_uid = f.next_uid + 1, messages = f.messages + 1, octets = f.octets + EXCLUDED.octets
RETURNING f.id, f.next_uid - 1, f.uidvalidity
"""
# Parameters: folder id, uidl.
_UIDL_SERVED: Final = "SELECT 1 FROM mail_messages WHERE folder_id = %s AND kept_uidl = %s"
# Parameters: id, folder id, uid, size, stored, arrived, kept uidl.
_MESSAGE: Final = """
INSERT INTO mail_messages (id, folder_id, uid, size, stored, arrived, kept_uidl)
VALUES (%s, %s, %s, %s, %s, %s, %s)
"""
# Parameters: user, delivery id, key, delivered.
_RECORD: Final = """
INSERT INTO mail_deliveries (username, delivery_id, key, delivered) VALUES (%s, %s, %s, %s)
ON CONFLICT (username, delivery_id) DO UPDATE
    SET key = EXCLUDED.key, delivered = EXCLUDED.delivered
"""


async def deliver_chunks(
    pool: AsyncConnectionPool,
    user: str,
    folder: str,
    chunks: AsyncIterator[bytes],
    *,
    uidl: str | None,
    delivery_id: str | None,
    now: float,
    cutoff: float | None,
) -> str:
    """Store the message ``chunks`` make in ``folder`` (made if missing), committed;
    its key. ``cutoff``: delivery ids recorded after it count as this delivery's."""
    first = await anext(chunks, b"")
    second = await anext(chunks, None) if first else None
    if second is None and uidl is None:
        return await _deliver_small(pool, user, folder, first, delivery_id, now, cutoff)

    async def rest() -> AsyncIterator[bytes]:
        yield first
        if second is not None:
            yield second
            async for chunk in chunks:
                yield chunk

    doing = f"deliver to {folder} of {user}"
    async with transaction(pool, StoreError, doing) as conn:
        if delivery_id is not None:
            found = await _duplicate(conn, user, delivery_id, cutoff)
            if found is not None:
                return found
        cursor = await conn.execute(_NEW_ID)
        row = await cursor.fetchone()
        assert row is not None
        message_id = int(row[0])
        counter = WireSizeCounter()
        async with conn.cursor() as copying, copying.copy(_COPY) as copy:
            copy.set_types(["int8", "int4", "bytea"])
            seq = 0
            async for chunk in rest():
                if chunk:
                    counter.feed(chunk)
                    await copy.write_row((message_id, seq, chunk))
                    seq += 1
        cursor = await conn.execute(_NEXT_UID, (user, folder, counter.wire))
        row = await cursor.fetchone()
        assert row is not None
        folder_id, uid, uidvalidity = (int(value) for value in row)
        kept = await _kept_uidl(conn, user, folder, folder_id, uidvalidity, uidl)
        await conn.execute(
            _MESSAGE, (message_id, folder_id, uid, counter.wire, counter.stored, now, kept)
        )
        key = kept or own_uidl(uidvalidity, uid)
        if delivery_id is not None:
            await conn.execute(_RECORD, (user, delivery_id, key, now))
    return key


async def _deliver_small(
    pool: AsyncConnectionPool,
    user: str,
    folder: str,
    data: bytes,
    delivery_id: str | None,
    now: float,
    cutoff: float | None,
) -> str:
    params = {
        "user": user,
        "folder": folder,
        "id": delivery_id,
        "cutoff": cutoff,
        "size": wire_size(data),
        "stored": len(data),
        "arrived": now,
        "data": data,
    }
    async with autocommit(pool, f"deliver to {folder} of {user}") as conn:
        cursor = await conn.execute(_ONE_STATEMENT, params, prepare=True)
        row = await cursor.fetchone()
    assert row is not None
    duplicate, key = row
    if duplicate is not None:
        _log_duplicate(user, delivery_id, duplicate)
        return str(duplicate)
    return str(key)


async def _duplicate(
    conn: psycopg.AsyncConnection, user: str, delivery_id: str, cutoff: float | None
) -> str | None:
    cursor = await conn.execute(_DUPLICATE, (user, delivery_id, cutoff))
    row = await cursor.fetchone()
    if row is None:
        return None
    _log_duplicate(user, delivery_id, row[0])
    return str(row[0])


def _log_duplicate(user: str, delivery_id: str | None, key: str) -> None:
    log.info(
        "delivery %s to %s was stored before as %s; not stored again", delivery_id, user, key
    )


async def _kept_uidl(
    conn: psycopg.AsyncConnection,
    user: str,
    folder: str,
    folder_id: int,
    uidvalidity: int,
    uidl: str | None,
) -> str | None:
    """``uidl`` if the message may keep it (the folder row is locked), else None."""
    if uidl is None:
        return None
    served = is_own_form(uidl, uidvalidity)
    if not served:
        cursor = await conn.execute(_UIDL_SERVED, (folder_id, uidl))
        served = await cursor.fetchone() is not None
    if served:
        log.warning(
            "folder %s of %s: kept UIDL %s is served already or in popbox's own form; "
            "the message gets popbox's own UIDL",
            folder,
            user,
            uidl,
        )
        return None
    return uidl
