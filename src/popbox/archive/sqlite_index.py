"""The statements of the embedded archive (popbox.archive.sqlite): storing prepared
messages with their pieces and index text, finding, searching with snippets, and
removing entries with what they alone used. Each function takes the connection it
runs on; the caller holds the locks and the transaction rules of popbox.archive.sqlite.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, Final

from popbox.archive.base import Added, ArchiveSource, Entry, Query
from popbox.archive.extract import Extracted
from popbox.archive.fts import compile_query, owner_token
from popbox.archive.ingest import Prepared
from popbox.archive.objects import ObjectStore, compress, decompress
from popbox.archive.sqlite_schema import ENTRY_COLUMNS, entry_from_row
from popbox.errors import ArchiveError

__all__ = [
    "INLINE_BELOW",
    "find_entry",
    "lookup_user",
    "message_pieces",
    "remove_entries",
    "search_rows",
    "store_prepared",
    "stored_chunks",
    "text_row",
]

# Pieces smaller than this are kept (compressed) in the index rather than as files:
# SQLite reads and writes small blobs faster than the file system creates files, and
# they commit with the entry, no fsync of their own.
INLINE_BELOW: Final = 64 * 1024
# How many values one "IN (...)" lists (SQLite's limit is far higher; a plan stays small).
IN_CHUNK: Final = 500
# From this many matches a page walks the user's entries newest first, keeping the
# matches (about limit * entries / matches steps), rather than sorting every match.
TIME_WALK_FROM: Final = 500


def lookup_user(connection: sqlite3.Connection, name: str) -> int | None:
    row = connection.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def find_entry(connection: sqlite3.Connection, user: str, entry_id: int) -> tuple[Any, ...] | None:
    """The row (ENTRY_COLUMNS) of the user's entry, or None (another user's is none)."""
    row: tuple[Any, ...] | None = connection.execute(
        f"SELECT {ENTRY_COLUMNS} FROM entries e JOIN users u ON u.id = e.user_id "  # noqa: S608
        "WHERE e.id = ? AND u.name = ?",
        (entry_id, user),
    ).fetchone()
    return row


def text_row(entry_id: int, user_id: int, text: Extracted) -> tuple[object, ...]:
    """The FTS5 row of an entry from what extract found."""
    filenames = " ".join(text.attachments)
    return (entry_id, owner_token(user_id), text.sender, text.recipients, text.subject,
            text.body, filenames)  # fmt: skip


def message_pieces(connection: sqlite3.Connection, digest: bytes) -> list[tuple[bytes, bool]]:
    """A stored message's pieces in order: (digest, whether it is an object file)."""
    row = connection.execute("SELECT pieces FROM messages WHERE digest = ?", (digest,)).fetchone()
    if row is None:
        raise ArchiveError(f"archived message {digest.hex()} is missing")
    blob = bytes(row[0])
    keys = [blob[start : start + 32] for start in range(0, len(blob), 32)]
    in_file = {
        bytes(key): bool(is_file)
        for key, is_file in _in_chunks(
            connection,
            "SELECT digest, data IS NULL FROM objects WHERE digest IN ({marks})",
            list(dict.fromkeys(keys)),
        )
    }
    if len(in_file) != len(set(keys)):
        raise ArchiveError(f"archived message {digest.hex()} lacks pieces")
    return [(key, in_file[key]) for key in keys]


def _in_chunks(
    connection: sqlite3.Connection, sql: str, values: Sequence[object], *prefix: object
) -> Iterator[tuple[Any, ...]]:
    for start in range(0, len(values), IN_CHUNK):
        chunk = values[start : start + IN_CHUNK]
        yield from connection.execute(
            sql.format(marks=",".join("?" * len(chunk))), (*prefix, *chunk)
        )


def _write_pieces(
    connection: sqlite3.Connection, objects: ObjectStore, messages: list[Prepared]
) -> dict[bytes, bytes | None]:
    """Store the pieces of ``messages`` that no object holds yet: large ones as
    durable files now, small ones compressed for the index. Returns digest ->
    compressed octets (None: a file) for each new piece."""
    wanted: dict[str, tuple[Prepared, int]] = {}
    for message in messages:
        for index, piece in enumerate(message.pieces):
            wanted.setdefault(piece.digest, (message, index))
    keys = [bytes.fromhex(digest) for digest in wanted]
    known = {
        bytes(row[0])
        for row in _in_chunks(
            connection, "SELECT digest FROM objects WHERE digest IN ({marks})", keys
        )
    }
    new: dict[bytes, bytes | None] = {}
    paths = []
    for digest, (message, index) in wanted.items():
        key = bytes.fromhex(digest)
        if key in known:
            continue
        piece = message.pieces[index]
        with message.piece(piece) as view:
            if piece.size >= INLINE_BELOW:
                paths.append(objects.write(digest, view))
                new[key] = None
            else:
                new[key] = compress(view)
    ObjectStore.sync(paths)
    return new


def store_prepared(
    connection: sqlite3.Connection,
    objects: ObjectStore,
    user: str,
    prepared: list[Prepared],
    source: ArchiveSource,
    folder: str,
    received: float,
    origin: str | None,
) -> list[Added]:
    """Keep ``prepared`` for ``user``, inside the caller's write transaction: new
    pieces are made durable (object files fsynced) before the rows naming them are
    written, so they are durable before those rows can commit."""
    user_id = lookup_user(connection, user)
    digests = list(dict.fromkeys(bytes.fromhex(item.digest) for item in prepared))
    kept: dict[bytes, Entry] = {}
    if user_id is not None:
        for row in _in_chunks(
            connection,
            f"SELECT {ENTRY_COLUMNS} FROM entries e JOIN users u ON u.id = e.user_id "  # noqa: S608
            "WHERE e.user_id = ? AND e.digest IN ({marks})",
            digests,
            user_id,
        ):
            kept[bytes(row[2])] = entry_from_row(row)
    stored = {
        bytes(row[0])
        for row in _in_chunks(
            connection, "SELECT digest FROM messages WHERE digest IN ({marks})", digests
        )
    }
    fresh = [
        item
        for item in prepared
        if bytes.fromhex(item.digest) not in kept and bytes.fromhex(item.digest) not in stored
    ]
    new_pieces = _write_pieces(connection, objects, fresh)
    out: list[Added] = []
    if user_id is None:
        cursor = connection.execute("INSERT INTO users (name) VALUES (?)", (user,))
        user_id = int(cursor.lastrowid or 0)
    for item in prepared:
        digest = bytes.fromhex(item.digest)
        if digest in kept:
            out.append(Added(kept[digest], new=False))
            continue
        if digest in stored:
            connection.execute("UPDATE messages SET refs = refs + 1 WHERE digest = ?", (digest,))
        else:
            _insert_message(connection, item, new_pieces)
            stored.add(digest)
        entry = _insert_entry(connection, user, user_id, item, source, folder, received)
        kept[digest] = entry
        out.append(Added(entry, new=True))
    if origin is not None:
        connection.execute(
            "INSERT OR IGNORE INTO origins (user_id, origin) VALUES (?, ?)", (user_id, origin)
        )
    return out


def _insert_message(
    connection: sqlite3.Connection, item: Prepared, new_pieces: dict[bytes, bytes | None]
) -> None:
    keys = [bytes.fromhex(piece.digest) for piece in item.pieces]
    connection.execute(
        "INSERT INTO messages (digest, size, pieces, refs) VALUES (?, ?, ?, 1)",
        (bytes.fromhex(item.digest), item.size, b"".join(keys)),
    )
    for key, piece in zip(keys, item.pieces, strict=True):
        if key in new_pieces:
            connection.execute(
                "INSERT INTO objects (digest, size, refs, data) VALUES (?, ?, 1, ?)",
                (key, piece.size, new_pieces.pop(key)),
            )
        else:
            connection.execute("UPDATE objects SET refs = refs + 1 WHERE digest = ?", (key,))


def _insert_entry(
    connection: sqlite3.Connection,
    user: str,
    user_id: int,
    item: Prepared,
    source: ArchiveSource,
    folder: str,
    received: float,
) -> Entry:
    text = item.text
    date = text.date
    cursor = connection.execute(
        "INSERT INTO entries (user_id, digest, size, received, date, sort_time, sender, "
        "recipients, subject, message_id, attachments, has_attachment, source, folder) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            user_id, bytes.fromhex(item.digest), item.size, received, date,
            received if date is None else date, text.sender, text.recipients, text.subject,
            text.message_id, json.dumps(list(text.attachments), ensure_ascii=False),
            int(text.has_attachment), source.value, folder,
        ),
    )  # fmt: skip
    entry_id = int(cursor.lastrowid or 0)
    connection.execute(
        "INSERT INTO text (rowid, owner, sender, recipients, subject, body, filenames) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        text_row(entry_id, user_id, text),
    )
    return Entry(
        id=entry_id, user=user, digest=item.digest, size=item.size, received=received,
        date=date, sender=text.sender, recipients=text.recipients, subject=text.subject,
        message_id=text.message_id, attachments=text.attachments, source=source,
        folder=folder, hold=False,
    )  # fmt: skip


def remove_entries(connection: sqlite3.Connection, ids: list[int]) -> list[str]:
    """Delete entries (inside the caller's transaction) and whatever only they used;
    returns the object files to unlink once that has committed."""
    if not ids:
        return []
    digests = Counter(
        bytes(row[0])
        for row in _in_chunks(connection, "SELECT digest FROM entries WHERE id IN ({marks})", ids)
    )
    connection.executemany("DELETE FROM text WHERE rowid = ?", [(i,) for i in ids])
    connection.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids])
    freed: list[str] = []
    for digest, count in digests.items():
        # Plain UPDATE then SELECT: RETURNING on these WITHOUT ROWID tables gave
        # wrong values for expressions in SQLite 3.40.
        connection.execute("UPDATE messages SET refs = refs - ? WHERE digest = ?", (count, digest))
        row = connection.execute(
            "SELECT refs, pieces FROM messages WHERE digest = ?", (digest,)
        ).fetchone()
        if row is None or row[0] > 0:
            continue
        connection.execute("DELETE FROM messages WHERE digest = ?", (digest,))
        pieces = bytes(row[1])
        for start in range(0, len(pieces), 32):
            key = pieces[start : start + 32]
            connection.execute("UPDATE objects SET refs = refs - 1 WHERE digest = ?", (key,))
            left = connection.execute(
                "SELECT refs, data IS NULL FROM objects WHERE digest = ?", (key,)
            ).fetchone()
            if left is not None and left[0] <= 0:
                connection.execute("DELETE FROM objects WHERE digest = ?", (key,))
                if left[1]:
                    freed.append(key.hex())
    return freed


def stored_chunks(
    pieces: list[tuple[bytes, bool]],
    objects: ObjectStore,
    fetch: Callable[[bytes], bytes | None],
) -> Generator[bytes, None, None]:
    """A message's octets from its pieces ((digest, in a file)) in order; ``fetch``
    reads a small piece's compressed octets from the index when it is reached."""
    for key, in_file in pieces:
        if in_file:
            try:
                yield from objects.read(key.hex())
            except FileNotFoundError as exc:
                raise ArchiveError(f"archived object {key.hex()} is missing") from exc
        else:
            data = fetch(key)
            if data is None:
                raise ArchiveError(f"archived object {key.hex()} is missing")
            yield decompress(data)


def search_rows(
    connection: sqlite3.Connection,
    user_id: int,
    query: Query,
    limit: int,
    offset: int,
    *,
    after_id: int | None = None,
) -> tuple[int, list[Entry]]:
    """How many of the user's entries match and one page of them: newest first, or
    (``after_id``) in id order above it, without counting."""
    compiled = compile_query(query, user_id)
    if compiled.match is not None:
        # CROSS JOIN: the index is walked first, never every entry of the user.
        source = "text CROSS JOIN entries e ON e.id = text.rowid"
        condition = "text MATCH ? AND e.user_id = ?"
        params: list[object] = [compiled.match, user_id]
    else:
        source = "entries e"
        condition = "e.user_id = ?"
        params = [user_id]
    where = f"{condition} AND {compiled.where}"
    params.extend(compiled.params)
    if after_id is not None:
        # On the FTS5 rowid when there is a match: FTS5 then starts past it itself.
        key = "text.rowid" if compiled.match is not None else "e.id"
        rows = connection.execute(
            f"SELECT {ENTRY_COLUMNS} FROM {source} JOIN users u ON u.id = e.user_id "  # noqa: S608
            f"WHERE {where} AND {key} > ? ORDER BY {key} LIMIT ?",
            (*params, after_id, limit),
        )
        return -1, [entry_from_row(row) for row in rows]
    if compiled.match is not None and compiled.where == "1":
        # Every row under the owner token is the user's: FTS5 counts its own doclists
        # without looking up each match's entry.
        count_sql = "SELECT count(*) FROM text WHERE text MATCH ?"
        count_params: list[object] = [compiled.match]
    else:
        count_sql = f"SELECT count(*) FROM {source} WHERE {where}"  # noqa: S608
        count_params = params
    total = int(connection.execute(count_sql, count_params).fetchone()[0])
    if compiled.match is not None and total >= TIME_WALK_FROM:
        # Many matches: walk the user's entries newest first and keep those among the
        # matches' rowids, rather than look up and sort every match to keep 50.
        rows = connection.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries e INDEXED BY entries_by_time "  # noqa: S608
            "JOIN users u ON u.id = e.user_id WHERE e.user_id = ? AND "
            f"e.id IN (SELECT rowid FROM text WHERE text MATCH ?) AND {compiled.where} "
            "ORDER BY e.sort_time DESC, e.id DESC LIMIT ? OFFSET ?",
            (user_id, compiled.match, *compiled.params, limit, offset),
        )
    else:
        rows = connection.execute(
            f"SELECT {ENTRY_COLUMNS} FROM {source} JOIN users u ON u.id = e.user_id "  # noqa: S608
            f"WHERE {where} ORDER BY e.sort_time DESC, e.id DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
    return total, [entry_from_row(row) for row in rows]
