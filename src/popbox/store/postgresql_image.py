"""Folder images of the PostgreSQL store (store.image): read a folder whole under its
lease, restore one resumably, remove one after a move.

A restore holds the target folder's lease (renewed, like a session's) and marks
the folder incomplete first, so no session is served a half-restored folder even if
the restore dies and its lease runs out (a login then gets ``[SYS/TEMP]``). Each
message is copied in a transaction of its own with the image's UID, arrival time and
kept UIDL, so a killed restore resumes where it stopped: UIDs already there are
skipped. The folder's next UID is raised to the image's at the start, so mail
delivered to the target meanwhile takes UIDs above every UID of the image and stays;
the last transaction removes what the target holds below that line that the image
lacks, sets the UIDVALIDITY and the state, recounts the counters and marks the
folder complete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from psycopg_pool import AsyncConnectionPool

from popbox.errors import NoSuchFolder, StoreError
from popbox.pgsql import transaction
from popbox.store.image import FolderImage, ImageMessage, ReadBody, RestoreReport
from popbox.store.postgresql_folders import columns_of
from popbox.store.postgresql_lease import DROP, Lease, LeaseTerms, fence, new_session, take
from popbox.store.postgresql_maildrop import read_body
from popbox.store.postgresql_schema import CHUNK_SIZE
from popbox.wireform import WireSizeCounter

__all__ = ["PostgresImageSource", "remove_folder", "restore_image"]

# Parameters: user, folder.
_FOLDER: Final = """
SELECT id, uidvalidity, next_uid, state FROM mail_folders WHERE username = %s AND name = %s
"""
# Parameters: folder id.
_MESSAGES: Final = """
SELECT uid, size, arrived, kept_uidl FROM mail_messages WHERE folder_id = %s ORDER BY uid
"""
# Make the target or mark it incomplete, its next UID above the image's. Parameters:
# user, folder, uidvalidity, next uid.
_START: Final = """
INSERT INTO mail_folders AS f (username, name, uidvalidity, next_uid, complete)
VALUES (%s, %s, %s, %s, false)
ON CONFLICT (username, name) DO UPDATE
    SET complete = false, next_uid = greatest(f.next_uid, EXCLUDED.next_uid)
RETURNING f.id, (SELECT string_agg(int8send(uid), ''::bytea ORDER BY uid)
                 FROM mail_messages WHERE folder_id = f.id)
"""
_NEW_ID: Final = "SELECT nextval(pg_get_serial_sequence('mail_messages', 'id'))"
_COPY: Final = "COPY mail_chunks (message_id, seq, data) FROM STDIN (FORMAT BINARY)"
# Parameters: id, folder id, uid, size, stored, arrived, kept uidl.
_MESSAGE: Final = """
INSERT INTO mail_messages (id, folder_id, uid, size, stored, arrived, kept_uidl)
VALUES (%s, %s, %s, %s, %s, %s, %s)
"""
# Parameters: folder id, image uids, image next uid.
_REMOVE_EXTRA: Final = """
DELETE FROM mail_messages
WHERE folder_id = %s AND NOT (uid = ANY(%s::bigint[])) AND uid < %s
"""
# Parameters: uidvalidity, next uid, state, folder id.
_FINISH: Final = """
UPDATE mail_folders AS f
SET uidvalidity = %s, next_uid = greatest(f.next_uid, %s), state = %s, complete = true,
    messages = (SELECT count(*) FROM mail_messages WHERE folder_id = f.id),
    octets = (SELECT coalesce(sum(size), 0) FROM mail_messages WHERE folder_id = f.id)
WHERE id = %s
"""
_REMOVE: Final = "DELETE FROM mail_folders WHERE username = %s AND name = %s"


class PostgresImageSource:
    """A folder read whole under its lease (store.image.ImageSource)."""

    def __init__(self, pool: AsyncConnectionPool, lease: Lease, folder_id: int, image: FolderImage):
        self._pool = pool
        self._lease = lease
        self._folder_id = folder_id
        self._image = image

    @classmethod
    async def open(
        cls, pool: AsyncConnectionPool, user: str, folder: str, terms: LeaseTerms
    ) -> PostgresImageSource:
        """Lease the folder and read its image: MaildropInUse, NoSuchFolder."""
        session = new_session()
        async with transaction(pool, StoreError, f"read folder {folder} of {user}") as conn:
            await take(conn, user, folder, terms, session)
            cursor = await conn.execute(_FOLDER, (user, folder))
            row = await cursor.fetchone()
            if row is None:
                raise NoSuchFolder(f"{user} has no folder {folder}")
            folder_id, uidvalidity, next_uid, state = row
            cursor = await conn.execute(_MESSAGES, (folder_id,))
            messages = [
                ImageMessage(int(uid), int(size), float(arrived), kept)
                for uid, size, arrived, kept in await cursor.fetchall()
            ]
        image = FolderImage(user, folder, uidvalidity, next_uid, messages, bytes(state))
        return cls(pool, Lease(pool, user, folder, terms, session), folder_id, image)

    @property
    def image(self) -> FolderImage:
        return self._image

    def read(self, uid: int) -> AsyncIterator[bytes]:
        name = f"{uid} of folder {self._image.folder} of {self._image.user}"
        return read_body(self._pool, self._folder_id, uid, name)

    async def close(self) -> None:
        await self._lease.release()


async def restore_image(
    pool: AsyncConnectionPool, image: FolderImage, read: ReadBody, terms: LeaseTerms
) -> RestoreReport:
    """Make the folder equal to ``image`` (store.image.ImageStore.restore_image)."""
    user, folder = image.user, image.folder
    session = new_session()
    report = RestoreReport()
    async with transaction(pool, StoreError, f"restore folder {folder} of {user}") as conn:
        await take(conn, user, folder, terms, session)
        cursor = await conn.execute(_START, (user, folder, image.uidvalidity, image.next_uid))
        row = await cursor.fetchone()
        assert row is not None
        folder_id, held = int(row[0]), set(columns_of(row[1]))
    lease = Lease(pool, user, folder, terms, session)
    try:
        for message in image.messages:
            if message.uid in held:
                report.skipped += 1
                continue
            report.octets += await _copy(pool, folder_id, message, read, lease)
            report.copied += 1
        wanted = [message.uid for message in image.messages]
        async with transaction(pool, StoreError, f"finish folder {folder} of {user}") as conn:
            await fence(conn, user, folder, session)
            cursor = await conn.execute(_REMOVE_EXTRA, (folder_id, wanted, image.next_uid))
            report.removed = max(cursor.rowcount, 0)
            await conn.execute(
                _FINISH, (image.uidvalidity, image.next_uid, image.state, folder_id)
            )
            await conn.execute(DROP, (user, folder, session))
        await lease.stop()
    finally:
        await lease.release()
    return report


async def _copy(
    pool: AsyncConnectionPool, folder_id: int, message: ImageMessage, read: ReadBody, lease: Lease
) -> int:
    """Copy one message in a transaction of its own; its stored octets."""
    counter = WireSizeCounter()
    doing = f"copy message {message.uid} into folder {lease.folder} of {lease.user}"
    async with transaction(pool, StoreError, doing) as conn:
        cursor = await conn.execute(_NEW_ID)
        row = await cursor.fetchone()
        assert row is not None
        message_id = int(row[0])
        async with conn.cursor() as copying, copying.copy(_COPY) as copy:
            copy.set_types(["int8", "int4", "bytea"])
            seq = 0
            async for data in read(message.uid):
                for at in range(0, len(data), CHUNK_SIZE):
                    piece = data[at : at + CHUNK_SIZE]
                    counter.feed(piece)
                    await copy.write_row((message_id, seq, piece))
                    seq += 1
        await conn.execute(
            _MESSAGE,
            (message_id, folder_id, message.uid, counter.wire, counter.stored, message.arrived,
             message.kept_uidl),
        )  # fmt: skip
        # Checked last, so the lease row is locked only for the commit: a login
        # meanwhile gets [IN-USE] at once instead of waiting for a long copy.
        await fence(conn, lease.user, lease.folder, lease.session)
    return counter.stored


async def remove_folder(
    pool: AsyncConnectionPool, user: str, folder: str, terms: LeaseTerms
) -> None:
    """Remove the folder and everything in it, under its lease: MaildropInUse."""
    session = new_session()
    async with transaction(pool, StoreError, f"remove folder {folder} of {user}") as conn:
        await take(conn, user, folder, terms, session)
        await conn.execute(_REMOVE, (user, folder))
        await conn.execute(DROP, (user, folder, session))

