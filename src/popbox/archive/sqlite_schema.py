"""The embedded archive's SQLite file: its tables, how a connection is opened, and
how a row becomes an Entry (popbox.archive.sqlite does the work).

Tables, and what each is for:

- ``users``: a user's name and the number their rows carry (and their FTS5 owner
  token is made from, popbox.archive.fts).
- ``objects``: each stored piece once, by SHA-256, with how many message pieces use
  it; a small piece's compressed octets sit in ``data``, a large one's in an object
  file (``data`` NULL, popbox.archive.objects).
- ``messages``: each distinct message once, by SHA-256: its size, its pieces in
  order (their digests, 32 octets each, concatenated) and how many entries use it.
- ``entries``: one user's kept copy of one message (UNIQUE per user and message),
  with what listings show and what searches filter on. Its indexes are created
  ``IF NOT EXISTS`` by every ``initialise``, so an archive made before one was added
  gains it when next opened (``entries_with_attachment``, a partial index that
  answers has:attachment without walking the user's other entries).
- ``origins``: where a user's messages were taken from (``known_origins``).
- ``text``: the FTS5 index, rowid = entry id, with the owner token in ``owner``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Final

from popbox.archive.base import ArchiveSource, Entry

__all__ = [
    "BUSY_TIMEOUT",
    "ENTRY_COLUMNS",
    "SCHEMA_VERSION",
    "connect",
    "entry_from_row",
    "initialise",
]

SCHEMA_VERSION: Final = 1
# How long a connection waits for another process's write (the server's workers and
# the CLI share the file): longer than any single commit, short of a hung request.
BUSY_TIMEOUT: Final = 30.0
# Pages the writer keeps cached (negative: KiB): an import touches the FTS5 index's
# pages over and over.
WRITER_CACHE_KIB: Final = 64 * 1024

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS objects (
    digest BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL,
    data BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    digest BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    pieces BLOB NOT NULL,
    refs INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id),
    digest BLOB NOT NULL,
    size INTEGER NOT NULL,
    received REAL NOT NULL,
    date REAL,
    sort_time REAL NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    subject TEXT NOT NULL,
    message_id TEXT NOT NULL,
    attachments TEXT NOT NULL,
    has_attachment INTEGER NOT NULL,
    source TEXT NOT NULL,
    folder TEXT NOT NULL,
    hold INTEGER NOT NULL DEFAULT 0,
    UNIQUE (user_id, digest)
);
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (user_id, sort_time DESC, id DESC);
CREATE INDEX IF NOT EXISTS entries_by_user ON entries (user_id, id);
CREATE INDEX IF NOT EXISTS entries_by_received ON entries (user_id, received);
CREATE INDEX IF NOT EXISTS entries_with_attachment ON entries (user_id, sort_time DESC, id DESC)
    WHERE has_attachment = 1;
CREATE TABLE IF NOT EXISTS origins (
    user_id INTEGER NOT NULL,
    origin TEXT NOT NULL,
    PRIMARY KEY (user_id, origin)
) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS text USING fts5 (
    owner, sender, recipients, subject, body, filenames,
    tokenize = 'unicode61 remove_diacritics 2'
);
"""

ENTRY_COLUMNS: Final = (
    "e.id, u.name, e.digest, e.size, e.received, e.date, e.sender, e.recipients, "
    "e.subject, e.message_id, e.attachments, e.source, e.folder, e.hold"
)


def connect(path: Path, *, writer: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are begun explicitly), WAL,
    fully synchronous, waiting BUSY_TIMEOUT for other processes."""
    connection = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        # WAL: readers never block the writer; FULL: a commit survives a power cut.
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        if writer:
            connection.execute(f"PRAGMA cache_size = {-WRITER_CACHE_KIB}")
    except BaseException:
        connection.close()
        raise
    return connection


def initialise(connection: sqlite3.Connection) -> None:
    """Create the tables if they are not there yet (every process may race to)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)
        if version == 0:
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def entry_from_row(row: tuple[Any, ...]) -> Entry:
    """A row of ENTRY_COLUMNS as an Entry."""
    (entry_id, user, digest, size, received, date, sender, recipients, subject,
     message_id, attachments, source, folder, hold) = row  # fmt: skip
    return Entry(
        id=entry_id,
        user=user,
        digest=bytes(digest).hex(),
        size=size,
        received=received,
        date=date,
        sender=sender,
        recipients=recipients,
        subject=subject,
        message_id=message_id,
        attachments=tuple(json.loads(attachments)),
        source=ArchiveSource(source),
        folder=folder,
        hold=bool(hold),
    )
