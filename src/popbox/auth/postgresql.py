"""Users in PostgreSQL: the passwd file's columns in a table that every node shares.

Two tables (the ``users`` schema, versioned by popbox.pgsql)::

    popbox_users        name, password, uid, gid, gecos, home, shell, extra
                        one row per user: the columns of a passwd line, the password
                        the ``{SCHEME}`` value exactly as the file holds it and
                        ``extra`` the extra fields as ``key=value`` tokens in order
    popbox_credentials  name, kind, label, key_id, secret, created
                        the side file's columns (auth.credentials): app passwords
                        and APOP secrets, gone with their user

A row is read as the passwd file reads a line (auth.entries) and checked as the file's
users are (auth.checks), so a user gives the same record, the same hashes and the
same refusals on either backend. Every login asks the database: a password changed
or an app password revoked on one node counts at the next login on every node. The
only memory kept is the record of each user seen (CachedUsers: the Maildir location
reads it) and the Imitation that unknown names are checked against, re-read from a
sample of the users every ``IMITATION_REFRESH`` seconds.

The pool opens and the tables are made on first use, so a node starts while the
database is away; every driver failure is an AuthError (``-ERR [SYS/TEMP]``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from popbox.auth.base import SCRAM_HASHES, ScramCredentials, UserRecord
from popbox.auth.checks import (
    Imitation,
    Imitator,
    apop_secret_for,
    check_password,
    scram_credentials_for,
)
from popbox.auth.credentials import AppPassword, app_password_key
from popbox.auth.entries import PasswdEntry, PasswdFields, entry_of
from popbox.auth.hasher import Hasher, shared_hasher
from popbox.auth.names import is_valid_username
from popbox.auth.schemes import DEFAULT_SCHEME, plaintext_of
from popbox.errors import AuthError
from popbox.pgsql import PoolSettings, Schema, database_errors, ensure_schema, open_pool

__all__ = [
    "IMITATION_REFRESH",
    "IMITATION_SAMPLE",
    "USER_SCHEMA",
    "PostgresPassDB",
    "UserTables",
    "entry_of_row",
]

log = logging.getLogger(__name__)

USER_SCHEMA: Final = Schema(
    "users",
    [
        """
        CREATE TABLE popbox_users (
            name text PRIMARY KEY CHECK (name <> ''),
            password text NOT NULL DEFAULT '',
            uid text NOT NULL DEFAULT '',
            gid text NOT NULL DEFAULT '',
            gecos text NOT NULL DEFAULT '',
            home text NOT NULL DEFAULT '',
            shell text NOT NULL DEFAULT '',
            extra text[] NOT NULL DEFAULT '{}'
        );
        CREATE TABLE popbox_credentials (
            name text NOT NULL
                REFERENCES popbox_users (name) ON DELETE CASCADE ON UPDATE CASCADE,
            kind text NOT NULL CHECK (kind IN ('app', 'apop')),
            label text NOT NULL,
            key_id text NOT NULL DEFAULT '',
            secret text NOT NULL,
            created bigint NOT NULL,
            PRIMARY KEY (name, kind, label)
        );
        CREATE UNIQUE INDEX popbox_credentials_app_id
            ON popbox_credentials (name, key_id) WHERE kind = 'app';
        """,
    ],
)

# How stale the dummy hash and SCRAM figures of unknown names may be: users change
# schemes slowly (a rehash campaign takes weeks), and the refresh is one query.
IMITATION_REFRESH: Final = 300.0
# The users the Imitation is taken from: the most common cost of a thousand random
# users is the most common cost of them all, give or take a rare tie.
IMITATION_SAMPLE: Final = 1000

_POOL_NAME: Final = "popbox-users"
# Queries spelled out whole (no formatting into SQL); a user row's columns first.
_SELECT_USER: Final = (
    "SELECT name, password, uid, gid, gecos, home, shell, extra FROM popbox_users "
    "WHERE name = %s"
)
_SELECT_FOR_VERIFY: Final = """
    SELECT u.name, u.password, u.uid, u.gid, u.gecos, u.home, u.shell, u.extra,
        c.label, c.key_id, c.secret, c.created
    FROM popbox_users u
    LEFT JOIN popbox_credentials c
        ON c.name = u.name AND c.kind = 'app' AND c.key_id = %s
    WHERE u.name = %s
"""
_SELECT_WITH_APOP: Final = """
    SELECT u.name, u.password, u.uid, u.gid, u.gecos, u.home, u.shell, u.extra, c.secret
    FROM popbox_users u
    LEFT JOIN popbox_credentials c ON c.name = u.name AND c.kind = 'apop'
    WHERE u.name = %s
"""
_SELECT_ALL: Final = (
    "SELECT name, password, uid, gid, gecos, home, shell, extra FROM popbox_users "
    'ORDER BY name COLLATE "C"'
)
_SELECT_SAMPLE: Final = (
    "SELECT name, password, uid, gid, gecos, home, shell, extra FROM popbox_users "
    "ORDER BY random() LIMIT %s"
)


def entry_of_row(row: Sequence[Any]) -> PasswdEntry | None:
    """The entry of a user row (its first eight columns); None, logged, for a row
    no passwd file could hold (a name that is no user's, put in by hand)."""
    name, password, uid, gid, gecos, home, shell, extra = row[:8]
    fields = PasswdFields(name, password, uid, gid, gecos, home, shell, tuple(extra))
    try:
        return entry_of(fields)
    except ValueError as exc:
        log.warning("popbox_users: row %.40r ignored: %s", fields.name, exc)
        return None


class UserTables:
    """The pool to the user tables, opened and the tables made on first use (under
    a lock, so concurrent first logins do it once); shared by a PassDB and an admin."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self._pool: AsyncConnectionPool | None = None
        self._ready = False
        self._lock: asyncio.Lock | None = None

    async def pool(self) -> AsyncConnectionPool:
        """The open pool, the tables made; AuthError while the database is away."""
        if self._ready and self._pool is not None:
            return self._pool
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is None:
                with database_errors(AuthError, "open the user database"):
                    self._pool = await open_pool(self.settings, name=_POOL_NAME)
            if not self._ready:
                await ensure_schema(self._pool, USER_SCHEMA, error=AuthError)
                self._ready = True
        return self._pool

    async def fetch_one(self, query: str, params: Sequence[Any], doing: str) -> Any:
        """The first row of ``query`` (None for none), driver errors as AuthError."""
        pool = await self.pool()
        with database_errors(AuthError, doing):
            async with pool.connection() as conn:
                cursor = await conn.execute(query.encode(), params)
                return await cursor.fetchone()

    async def fetch_all(self, query: str, params: Sequence[Any], doing: str) -> list[Any]:
        pool = await self.pool()
        with database_errors(AuthError, doing):
            async with pool.connection() as conn:
                cursor = await conn.execute(query.encode(), params)
                return await cursor.fetchall()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._ready = False
        if pool is not None:
            await pool.close()


class PostgresPassDB:
    """A PassDB over the PostgreSQL user tables (module docstring).

    Also a UserDirectory (``users`` lists every user, on a connection of its own:
    it is called from threads) and CachedUsers (the records of the users seen).
    """

    def __init__(
        self,
        settings: PoolSettings,
        *,
        default_scheme: str = DEFAULT_SCHEME,
        hasher: Hasher | None = None,
        imitation_refresh: float = IMITATION_REFRESH,
    ) -> None:
        """``hasher`` runs the password checks (default: the process's shared one);
        ``imitation_refresh``: seconds between readings of the users' costs."""
        self.tables = UserTables(settings)
        self._hasher = hasher if hasher is not None else shared_hasher()
        self._imitator = Imitator(default_scheme)
        self._imitation = self._imitator.empty
        self._imitation_at: float | None = None
        self._imitation_refresh = imitation_refresh
        self._imitation_lock: asyncio.Lock | None = None
        self._records: dict[str, UserRecord] = {}

    async def close(self) -> None:
        """Close the pool (the server's shutdown; the CLI when done)."""
        await self.tables.close()

    # -- the PassDB ----------------------------------------------------------------

    async def verify(self, username: str, password: str) -> UserRecord | None:
        """The user if the password (or one of their app passwords) is right."""
        entry: PasswdEntry | None = None
        app: tuple[AppPassword, str] | None = None
        if is_valid_username(username):
            key = app_password_key(password)
            row = await self.tables.fetch_one(
                _SELECT_FOR_VERIFY, (key[0] if key else None, username), "check a password"
            )
            entry = self._seen(username, row)
            if row is not None and key is not None and row[8] is not None:
                label, key_id, secret, created = row[8:12]
                app = (AppPassword(username, label, key_id, secret, int(created)), key[1])
        imitation = await self._current_imitation()
        return await self._hasher.run(check_password, entry, password, imitation, app)

    async def lookup(self, username: str) -> UserRecord | None:
        """The user, without a password check (delivery, quotas); None if unknown."""
        if not is_valid_username(username):
            return None
        row = await self.tables.fetch_one(_SELECT_USER, (username,), "look up a user")
        entry = self._seen(username, row)
        return entry.record if entry is not None else None

    async def plaintext_secret(self, username: str) -> str | None:
        """The user's APOP secret (never their password); None for a user without
        one, a user who cannot log in and unknown users."""
        if not is_valid_username(username):
            return None
        row = await self.tables.fetch_one(_SELECT_WITH_APOP, (username,), "read an APOP secret")
        entry = self._seen(username, row)
        secret = plaintext_of(row[8]) if row is not None and row[8] is not None else None
        return apop_secret_for(entry, secret)

    async def scram_credentials(self, username: str, hash_name: str) -> ScramCredentials:
        """``username``'s SCRAM credentials, or fakes saying why there are none."""
        if hash_name not in SCRAM_HASHES:
            raise ValueError(f"not a SCRAM hash: {hash_name!r}")
        entry = None
        if is_valid_username(username):
            row = await self.tables.fetch_one(_SELECT_USER, (username,), "read SCRAM keys")
            entry = self._seen(username, row)
        imitation = await self._current_imitation()
        return await self._hasher.run(
            scram_credentials_for, entry, username, hash_name, imitation
        )

    # -- UserDirectory and CachedUsers --------------------------------------------

    def users(self) -> list[UserRecord]:
        """Every user, by name (blocking: its own connection; run it in a thread).

        The records replace those kept for ``cached_record``, so a sweep over the
        users finds each one's mail where their row says.
        """
        settings = self.tables.settings
        with database_errors(AuthError, "list the users"):
            try:
                with psycopg.connect(
                    settings.dsn,
                    connect_timeout=settings.connect_timeout,
                    application_name=settings.application_name,
                ) as conn:
                    rows = conn.execute(_SELECT_ALL.encode()).fetchall()
            except psycopg.errors.UndefinedTable:
                rows = []  # no user has logged in or been added yet: no tables yet
        entries = [entry_of_row(row) for row in rows]
        records = {entry.record.name: entry.record for entry in entries if entry is not None}
        self._records = records
        return list(records.values())

    def cached_record(self, username: str) -> UserRecord | None:
        """The user as last read from the database, without asking it (no I/O)."""
        return self._records.get(username)

    # -- inside --------------------------------------------------------------------

    def _seen(self, username: str, row: Sequence[Any] | None) -> PasswdEntry | None:
        """The entry of ``row`` (None for none), its record kept for cached_record."""
        entry = entry_of_row(row) if row is not None else None
        if entry is None:
            self._records.pop(username, None)
        else:
            self._records[username] = entry.record
        return entry

    async def _current_imitation(self) -> Imitation:
        """The Imitation of a sample of the users, re-read when it is stale."""
        at = self._imitation_at
        if at is not None and time.monotonic() - at < self._imitation_refresh:
            return self._imitation
        if self._imitation_lock is None:
            self._imitation_lock = asyncio.Lock()
        async with self._imitation_lock:
            at = self._imitation_at
            if at is None or time.monotonic() - at >= self._imitation_refresh:
                rows = await self.tables.fetch_all(
                    _SELECT_SAMPLE, (IMITATION_SAMPLE,), "sample the users' hashes"
                )
                entries = [entry for entry in map(entry_of_row, rows) if entry is not None]
                self._imitation = await self._hasher.run(self._imitator.imitate, entries)
                self._imitation_at = time.monotonic()
        return self._imitation
