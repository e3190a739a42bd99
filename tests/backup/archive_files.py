"""An archive in the embedded archive's layout, for backup tests: ``index.sqlite``
(WAL mode, an FTS5 index naming each entry's object by its SHA-256) and ``objects/``
(immutable files named by their content's SHA-256, written and fsynced before the
index entry that names them, as popbox.archive's rules ask).

The backup does not read the archive through popbox.archive: it only needs the
layout, so this stands in for whichever SQLite archive fills it.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, digest TEXT NOT NULL, subject TEXT NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(subject, body);
"""


@dataclass(frozen=True)
class Hit:
    id: int
    user: str
    digest: str
    subject: str


class ArchiveFiles:
    """Adds and searches entries; one connection, used from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "objects").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(path / "index.sqlite", timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def object_path(self, digest: str) -> Path:
        return self.path / "objects" / digest[:2] / digest

    def add(self, user: str, subject: str, body: str) -> int:
        data = f"Subject: {subject}\r\n\r\n{body}\r\n".encode()
        digest = hashlib.sha256(data).hexdigest()
        target = self.object_path(digest)
        target.parent.mkdir(exist_ok=True, mode=0o700)
        if not target.exists():
            temporary = target.with_name(f".{digest}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, target)
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO entries (user, digest, subject) VALUES (?, ?, ?)",
                (user, digest, subject),
            )
            assert cursor.lastrowid is not None
            self._db.execute(
                "INSERT INTO search (rowid, subject, body) VALUES (?, ?, ?)",
                (cursor.lastrowid, subject, body),
            )
        return cursor.lastrowid

    def search(self, term: str) -> list[Hit]:
        rows = self._db.execute(
            "SELECT e.id, e.user, e.digest, e.subject FROM search s JOIN entries e "
            "ON e.id = s.rowid WHERE search MATCH ? ORDER BY e.id",
            (term,),
        )
        return [Hit(*row) for row in rows]

    def ids(self) -> list[int]:
        return [row[0] for row in self._db.execute("SELECT id FROM entries ORDER BY id")]

    def read(self, digest: str) -> bytes:
        return self.object_path(digest).read_bytes()
