"""Upkeep of the embedded archive (popbox.archive.sqlite): rebuilding the search
index from the stored messages, and removing objects no index row names (what a
crash between an object's write and its commit, or between a commit and an unlink,
leaves behind). Both run under the archive's write lock, so no writer is at work.
"""

from __future__ import annotations

import json
import mmap
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Final

from popbox.archive.extract import Extracted, extract
from popbox.archive.objects import ObjectStore
from popbox.archive.sqlite_index import lookup_user, message_pieces, stored_chunks, text_row

__all__ = [
    "REINDEX_BATCH",
    "collect_garbage",
    "drop_stray_text",
    "entries_to_reindex",
    "reindex_entries",
]

# Entries re-extracted per commit (and per hold of the write lock): a long rebuild
# makes progress that survives a stop, and deliveries get the lock in between.
REINDEX_BATCH: Final = 500
# A message up to this size is re-read into memory; a larger one is spooled to a
# temporary file and mapped, so reindexing a 50 MB message costs no 50 MB.
SPOOL_ABOVE: Final = 4 * 1024 * 1024


def _extract_stored(
    connection: sqlite3.Connection, objects: ObjectStore, root: Path, digest: bytes, size: int
) -> Extracted:
    def fetch(key: bytes) -> bytes | None:
        row = connection.execute("SELECT data FROM objects WHERE digest = ?", (key,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    chunks = stored_chunks(message_pieces(connection, digest), objects, fetch)
    if size <= SPOOL_ABOVE:
        return extract(b"".join(chunks))
    with tempfile.TemporaryFile(dir=root, prefix=".reindex-") as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.flush()
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
            return extract(mapping)


def entries_to_reindex(connection: sqlite3.Connection, user: str | None) -> list[int]:
    """The ids of every entry (of ``user``, or all), in id order."""
    if user is None:
        return [row[0] for row in connection.execute("SELECT id FROM entries ORDER BY id")]
    user_id = lookup_user(connection, user)
    if user_id is None:
        return []
    return [
        row[0]
        for row in connection.execute(
            "SELECT id FROM entries WHERE user_id = ? ORDER BY id", (user_id,)
        )
    ]


def drop_stray_text(connection: sqlite3.Connection) -> int:
    """Remove index rows of entries that are gone; returns how many."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        count = connection.execute(
            "DELETE FROM text WHERE rowid NOT IN (SELECT id FROM entries)"
        ).rowcount
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return count


def reindex_entries(connection: sqlite3.Connection, objects: ObjectStore, ids: list[int]) -> int:
    """Re-extract entries (at most REINDEX_BATCH, one commit) from their stored
    messages and rewrite their listing columns and FTS5 rows; returns how many were
    indexed (an entry deleted meanwhile is skipped)."""
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows.extend(
            connection.execute(
                "SELECT id, user_id, digest, size, received FROM entries "  # noqa: S608
                f"WHERE id IN ({marks}) ORDER BY id",
                chunk,
            )
        )
    root = objects.directory.parent
    found = [
        (
            entry_id,
            user_id,
            received,
            _extract_stored(connection, objects, root, bytes(digest), size),
        )
        for entry_id, user_id, digest, size, received in rows
    ]
    connection.execute("BEGIN IMMEDIATE")
    try:
        for entry_id, user_id, received, text in found:
            connection.execute(
                "UPDATE entries SET date = ?, sort_time = ?, sender = ?, recipients = ?, "
                "subject = ?, message_id = ?, attachments = ?, has_attachment = ? "
                "WHERE id = ?",
                (
                    text.date, received if text.date is None else text.date, text.sender,
                    text.recipients, text.subject, text.message_id,
                    json.dumps(list(text.attachments), ensure_ascii=False),
                    int(text.has_attachment), entry_id,
                ),
            )  # fmt: skip
            connection.execute("DELETE FROM text WHERE rowid = ?", (entry_id,))
            connection.execute(
                "INSERT INTO text (rowid, owner, sender, recipients, subject, body, "
                "filenames) VALUES (?, ?, ?, ?, ?, ?, ?)",
                text_row(entry_id, user_id, text),
            )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return len(found)


def collect_garbage(connection: sqlite3.Connection, objects: ObjectStore) -> int:
    """Remove object files the index does not name and every temporary file (no
    writer is at work under the lock); returns how many files went."""
    removed = objects.remove_temporaries(min_age=0)
    named = {
        bytes(row[0]).hex()
        for row in connection.execute("SELECT digest FROM objects WHERE data IS NULL")
    }
    removed += objects.remove(digest for digest in objects.digests() if digest not in named)
    return removed
