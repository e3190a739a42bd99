"""The PostgreSQL archive's content: messages cut into pieces, each piece stored once
(zstd-compressed) however many messages and users hold it, counted, freed when the
last message that used it goes, and read back one piece at a time.

Counting under concurrency. ``refs`` change only under the row's lock, in the
transaction of the entry that takes or drops the reference, so two nodes that add
the same message at once both succeed and store it once (the second's insert waits
for the first and then counts one more), and a delete that frees the last reference
while another node adds it again either runs first (and the add stores it anew) or
after (and finds a reference left). Rows are locked in digest order, so two such
transactions never wait for each other in a circle over the same pieces.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

import psycopg
import zstandard
from psycopg_pool import AsyncConnectionPool

from popbox.archive.ingest import Prepared
from popbox.archive.postgresql_schema import DIGEST_SIZE, PIECE_SIZE
from popbox.archive.segments import Octets
from popbox.errors import ArchiveError, NoSuchEntry
from popbox.pgsql import autocommit

__all__ = [
    "Content",
    "cut",
    "piece_list_of",
    "read_pieces",
    "release",
    "split_piece_list",
    "take",
]

# zstd's default level: about the speed of reading the message, a third of base64's size.
COMPRESSION_LEVEL: Final = 3
# Pieces fetched per statement while a message is read: a few round trips for a large
# message, at most READ_PIECES * PIECE_SIZE octets held at once.
READ_PIECES: Final = 4
# A piece larger than this is compressed in a worker thread, off the event loop.
THREAD_ABOVE: Final = 64 * 1024

# Parameters: digests (sorted), digests, how much each count changes. Locks the rows
# that exist in digest order (so two transactions never wait for each other in a
# circle), then changes their counts; returns the digests counted.
_RECOUNT: Final = """
WITH locked AS MATERIALIZED (
    SELECT digest FROM {table} WHERE digest = ANY(%s) ORDER BY digest FOR UPDATE)
UPDATE {table} AS t SET refs = t.refs + c.n
FROM unnest(%s::bytea[], %s::integer[]) AS c(digest, n)
WHERE t.digest = c.digest AND t.digest IN (SELECT digest FROM locked)
RETURNING t.digest
"""
_RECOUNT_OBJECTS: Final = _RECOUNT.format(table="archive_objects")
_RECOUNT_MESSAGES: Final = _RECOUNT.format(table="archive_messages")
# Parameters: digest, size, frame.
_NEW_OBJECT: Final = """
INSERT INTO archive_objects (digest, size, refs, data) VALUES (%s, %s, 1, %s)
ON CONFLICT (digest) DO UPDATE SET refs = archive_objects.refs + 1
"""
_FREE_OBJECTS: Final = "DELETE FROM archive_objects WHERE digest = ANY(%s) AND refs = 0"
# Parameters: digest.
_COUNT_MESSAGE: Final = (
    "UPDATE archive_messages SET refs = refs + 1 WHERE digest = %s RETURNING digest"
)
# Parameters: digest, size, pieces.
_NEW_MESSAGE: Final = """
INSERT INTO archive_messages (digest, size, pieces, refs) VALUES (%s, %s, %s, 1)
ON CONFLICT (digest) DO NOTHING RETURNING digest
"""
_FREE_MESSAGES: Final = (
    "DELETE FROM archive_messages WHERE digest = ANY(%s) AND refs = 0 RETURNING pieces"
)
# Parameters: user, entry id.
_PIECES: Final = """
SELECT m.pieces FROM archive_entries AS e JOIN archive_messages AS m ON m.digest = e.digest
WHERE e.username = %s AND e.id = %s
"""
_FETCH: Final = "SELECT digest, size, data FROM archive_objects WHERE digest = ANY(%s)"


@dataclass(frozen=True, slots=True)
class Content:
    """One message as stored: its digest and size, and its pieces, each a span of
    ``data`` with its own digest."""

    data: Octets
    digest: bytes
    spans: tuple[tuple[int, int], ...]
    piece_digests: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def piece_list(self) -> bytes:
        """The pieces' digests in order, as ``archive_messages.pieces`` holds them."""
        return b"".join(self.piece_digests)

    def piece(self, index: int) -> bytes:
        start, end = self.spans[index]
        with memoryview(self.data) as view:
            return bytes(view[start:end])


def cut(prepared: Prepared) -> Content:
    """The prepared message's pieces (popbox.archive.ingest: one per segment), each
    cut again into PIECE_SIZE octets if larger. A segment is cut from its own start,
    so the same attachment gives the same pieces in any message."""
    spans: list[tuple[int, int]] = []
    digests: list[bytes] = []
    with memoryview(prepared.data) as view:
        for piece in prepared.pieces:
            if piece.size <= PIECE_SIZE:
                spans.append((piece.start, piece.end))
                digests.append(bytes.fromhex(piece.digest))
                continue
            for start in range(piece.start, piece.end, PIECE_SIZE):
                end = min(start + PIECE_SIZE, piece.end)
                spans.append((start, end))
                with view[start:end] as part:
                    digests.append(hashlib.sha256(part).digest())
    return Content(prepared.data, bytes.fromhex(prepared.digest), tuple(spans), tuple(digests))


async def take(conn: psycopg.AsyncConnection, content: Content, *, counted: bool) -> None:
    """Count one more entry for ``content`` (``counted``: the entry's own statement
    counted it already, as it does when the message is stored), storing it if it is
    not stored yet."""
    while not counted:
        cursor = await conn.execute(
            _NEW_MESSAGE, (content.digest, content.size, content.piece_list)
        )
        if await cursor.fetchone() is not None:
            await _take_pieces(conn, content)
            return
        # Stored by another node meanwhile (the insert waited for it): count it.
        cursor = await conn.execute(_COUNT_MESSAGE, (content.digest,))
        counted = await cursor.fetchone() is not None


async def _take_pieces(conn: psycopg.AsyncConnection, content: Content) -> None:
    """Count the new message's use of each of its distinct pieces, storing the
    pieces no message had yet."""
    by_digest = {digest: index for index, digest in enumerate(content.piece_digests)}
    digests = sorted(by_digest)
    cursor = await conn.execute(_RECOUNT_OBJECTS, (digests, digests, [1] * len(digests)))
    present = {bytes(row[0]) for row in await cursor.fetchall()}
    compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
    async with conn.pipeline():
        for digest in digests:
            if digest in present:
                continue
            piece = content.piece(by_digest[digest])
            if len(piece) > THREAD_ABOVE:
                frame = await asyncio.to_thread(compressor.compress, piece)
            else:
                frame = compressor.compress(piece)
            await conn.execute(_NEW_OBJECT, (digest, len(piece), frame))


async def release(conn: psycopg.AsyncConnection, digests: Sequence[bytes]) -> None:
    """Count one entry less for each of ``digests`` (the messages of deleted entries,
    once per entry), freeing the messages and pieces nothing uses any more."""
    if not digests:
        return
    counts = Counter(bytes(digest) for digest in digests)
    ordered = sorted(counts)
    await conn.execute(_RECOUNT_MESSAGES, (ordered, ordered, [-counts[d] for d in ordered]))
    cursor = await conn.execute(_FREE_MESSAGES, (ordered,))
    pieces: Counter[bytes] = Counter()
    for (piece_list,) in await cursor.fetchall():
        pieces.update(set(split_piece_list(bytes(piece_list))))
    if not pieces:
        return
    objects = sorted(pieces)
    await conn.execute(_RECOUNT_OBJECTS, (objects, objects, [-pieces[d] for d in objects]))
    await conn.execute(_FREE_OBJECTS, (objects,))


def split_piece_list(piece_list: bytes) -> list[bytes]:
    return [piece_list[at : at + DIGEST_SIZE] for at in range(0, len(piece_list), DIGEST_SIZE)]


async def piece_list_of(pool: AsyncConnectionPool, user: str, entry_id: int) -> list[bytes] | None:
    """The digests of the pieces of the user's entry, or None if there is none."""
    async with autocommit(pool, ArchiveError, f"read entry {entry_id} of {user}") as conn:
        cursor = await conn.execute(_PIECES, (user, entry_id))
        row = await cursor.fetchone()
    return None if row is None else split_piece_list(bytes(row[0]))


async def read_pieces(
    pool: AsyncConnectionPool, digests: Sequence[bytes], doing: str
) -> AsyncIterator[bytes]:
    """The pieces named by ``digests``, in order, READ_PIECES per statement (each on
    a connection of its own: nothing is held while the reader takes its time). A
    piece that is gone is NoSuchEntry (the message was deleted meanwhile), a damaged
    one ArchiveError."""
    decompressor = zstandard.ZstdDecompressor()
    for at in range(0, len(digests), READ_PIECES):
        wanted = list(digests[at : at + READ_PIECES])
        async with autocommit(pool, ArchiveError, doing) as conn:
            cursor = await conn.execute(_FETCH, (list(set(wanted)),))
            rows = {bytes(row[0]): (int(row[1]), bytes(row[2])) for row in await cursor.fetchall()}
        for digest in wanted:
            if digest not in rows:
                # Its last entry was deleted meanwhile: the reader's entry is gone.
                raise NoSuchEntry(f"{doing}: the message was deleted while it was read")
            size, frame = rows[digest]
            try:
                piece = decompressor.decompress(frame, max_output_size=size)
            except zstandard.ZstdError as exc:
                raise ArchiveError(f"{doing}: a stored piece is damaged") from exc
            if len(piece) != size or hashlib.sha256(piece).digest() != digest:
                raise ArchiveError(f"{doing}: a stored piece is damaged")
            yield piece
