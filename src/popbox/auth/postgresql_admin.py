"""`popbox user` on the PostgreSQL user tables (auth.postgresql), and the import of a
Dovecot passwd file into them.

Each edit is one transaction; one that reads before it writes (a quota, a new app
password) locks the user's row first, so two admins at once both land. Values are
made and checked exactly as the passwd-file edits make them (auth.admin): a row
holds nothing a passwd line could not.

The import copies each line's columns as they are (hashes are not touched, so
every password keeps working) and the side file's app passwords and APOP secrets
of the users it copies. It is one transaction and can be run again: a line that
changed updates its row, an unchanged one is left alone; users and credentials the
file does not have are kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from psycopg import AsyncConnection

from popbox.auth.admin import (
    NoSuchCredential,
    NoSuchUser,
    UserExists,
    quota_fields,
    stored_password,
)
from popbox.auth.base import UserRecord
from popbox.auth.credentials import (
    KIND_APOP,
    KIND_APP,
    MAX_APP_PASSWORDS_PER_USER,
    AppPassword,
    app_password_key,
    check_label,
    generate_apop_secret,
    generate_app_password,
    parse_credentials,
)
from popbox.auth.entries import PasswdEntry, PasswdFields, entry_of, split_line
from popbox.auth.names import validate_username
from popbox.auth.passwdfile import parse_passwd
from popbox.auth.postgresql import UserTables, entry_of_row
from popbox.auth.schemes import DEFAULT_COST, DEFAULT_SCHEME, HashCost
from popbox.errors import AuthError
from popbox.pgsql import PoolSettings, transaction

__all__ = ["ImportReport", "PostgresUserAdmin"]

WHERE: Final = "the PostgreSQL user table"

_USER_ROW: Final = (
    "SELECT name, password, uid, gid, gecos, home, shell, extra FROM popbox_users "
    "WHERE name = %s"
)
_ALL_USERS: Final = (
    "SELECT name, password, uid, gid, gecos, home, shell, extra FROM popbox_users "
    'ORDER BY name COLLATE "C"'
)
_LOCK_USER: Final = "SELECT extra FROM popbox_users WHERE name = %s FOR UPDATE"
_UPSERT_USER: Final = """
    INSERT INTO popbox_users AS u (name, password, uid, gid, gecos, home, shell, extra)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (name) DO UPDATE SET
        password = EXCLUDED.password, uid = EXCLUDED.uid, gid = EXCLUDED.gid,
        gecos = EXCLUDED.gecos, home = EXCLUDED.home, shell = EXCLUDED.shell,
        extra = EXCLUDED.extra
    WHERE (u.password, u.uid, u.gid, u.gecos, u.home, u.shell, u.extra)
        IS DISTINCT FROM (EXCLUDED.password, EXCLUDED.uid, EXCLUDED.gid, EXCLUDED.gecos,
                          EXCLUDED.home, EXCLUDED.shell, EXCLUDED.extra)
    RETURNING (xmax = 0)
"""
_UPSERT_CREDENTIAL: Final = """
    INSERT INTO popbox_credentials AS c (name, kind, label, key_id, secret, created)
    VALUES (%s, %s, %s, %s, %s, %s)
    ON CONFLICT (name, kind, label) DO UPDATE SET
        key_id = EXCLUDED.key_id, secret = EXCLUDED.secret, created = EXCLUDED.created
    WHERE (c.key_id, c.secret, c.created)
        IS DISTINCT FROM (EXCLUDED.key_id, EXCLUDED.secret, EXCLUDED.created)
    RETURNING (xmax = 0)
"""


@dataclass(slots=True)
class ImportReport:
    """What an import did, counted."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    """Lines of the passwd file that are no user (malformed, duplicate; logged)."""
    credentials_added: int = 0
    credentials_updated: int = 0
    credentials_unchanged: int = 0
    credentials_skipped: int = 0
    """Credentials of users the passwd file does not have."""

    def summary(self) -> str:
        return (
            f"users: {self.added} added, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.skipped} lines skipped; app passwords and APOP secrets: "
            f"{self.credentials_added} added, {self.credentials_updated} updated, "
            f"{self.credentials_unchanged} unchanged, {self.credentials_skipped} skipped"
        )


def _checked(fields: PasswdFields) -> PasswdFields:
    """``fields`` if they read back as a user without problems (AuthError if not)."""
    try:
        entry = entry_of(fields)
    except ValueError as exc:
        raise AuthError(f"refusing to write an unreadable user: {exc}") from exc
    if entry.problems:
        raise AuthError(f"refusing to write a user who reads back with: {entry.problems[0]}")
    return fields


def _row(fields: PasswdFields) -> tuple[Any, ...]:
    return (
        fields.name, fields.password, fields.uid, fields.gid, fields.gecos,
        fields.home, fields.shell, list(fields.extra),
    )


class PostgresUserAdmin:
    """UserAdmin over the PostgreSQL user tables."""

    def __init__(self, settings: PoolSettings) -> None:
        self.tables = UserTables(settings)

    @property
    def where(self) -> str:
        return WHERE

    async def close(self) -> None:
        await self.tables.close()

    async def _lock_user(self, conn: AsyncConnection[Any], name: str) -> list[str]:
        """Lock ``name``'s row for this transaction; their extra tokens (NoSuchUser)."""
        row = await (await conn.execute(_LOCK_USER, (name,))).fetchone()
        if row is None:
            raise NoSuchUser(f"no user {name} in {WHERE}")
        return list(row[0])

    async def add_user(
        self,
        name: str,
        password: str,
        *,
        scheme: str = DEFAULT_SCHEME,
        quota_messages: int | None = None,
        quota_octets: int | None = None,
        cost: HashCost = DEFAULT_COST,
    ) -> UserRecord:
        validate_username(name)
        stored = await asyncio.to_thread(stored_password, password, scheme, cost)
        extra = tuple(quota_fields([], quota_messages, quota_octets))
        fields = _checked(PasswdFields(name, stored, extra=extra))
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, "add a user") as conn:
            cursor = await conn.execute(
                "INSERT INTO popbox_users (name, password, uid, gid, gecos, home, shell, extra) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                _row(fields),
            )
            if cursor.rowcount == 0:
                raise UserExists(f"user {name} already exists in {WHERE}")
        return UserRecord(name=name, quota_messages=quota_messages, quota_octets=quota_octets)

    async def set_password(
        self,
        name: str,
        password: str,
        *,
        scheme: str = DEFAULT_SCHEME,
        cost: HashCost = DEFAULT_COST,
    ) -> None:
        validate_username(name)
        stored = await asyncio.to_thread(stored_password, password, scheme, cost)
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, "set a password") as conn:
            cursor = await conn.execute(
                "UPDATE popbox_users SET password = %s WHERE name = %s", (stored, name)
            )
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no user {name} in {WHERE}")

    async def delete_user(self, name: str) -> None:
        validate_username(name)
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, "delete a user") as conn:
            # The credentials go with the row (ON DELETE CASCADE).
            cursor = await conn.execute("DELETE FROM popbox_users WHERE name = %s", (name,))
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no user {name} in {WHERE}")

    async def set_quota(self, name: str, messages: int | None, octets: int | None) -> None:
        validate_username(name)
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, "set a quota") as conn:
            extra = tuple(quota_fields(await self._lock_user(conn, name), messages, octets))
            _checked(PasswdFields(name, extra=extra))
            await conn.execute(
                "UPDATE popbox_users SET extra = %s WHERE name = %s", (list(extra), name)
            )

    async def list_users(self) -> list[UserRecord]:
        rows = await self.tables.fetch_all(_ALL_USERS, (), "list the users")
        return [entry.record for entry in map(entry_of_row, rows) if entry is not None]

    async def find_user(self, name: str) -> UserRecord | None:
        validate_username(name)
        row = await self.tables.fetch_one(_USER_ROW, (name,), "look up a user")
        entry = entry_of_row(row) if row is not None else None
        return entry.record if entry is not None else None

    async def add_app_password(
        self, user: str, label: str, *, scheme: str = DEFAULT_SCHEME, cost: HashCost = DEFAULT_COST
    ) -> str:
        validate_username(user)
        try:
            check_label(label)
        except ValueError as exc:
            raise AuthError(str(exc)) from exc
        key_id, password = generate_app_password()
        raw = app_password_key(password)
        assert raw is not None  # a generated password has the shape
        secret = await asyncio.to_thread(stored_password, raw[1], scheme, cost)
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, "add an app password") as conn:
            await self._lock_user(conn, user)
            cursor = await conn.execute(
                "SELECT label FROM popbox_credentials WHERE name = %s AND kind = 'app'", (user,)
            )
            taken = [row[0] for row in await cursor.fetchall()]
            if label in taken:
                raise AuthError(f"{user} already has an app password labelled {label}")
            if len(taken) >= MAX_APP_PASSWORDS_PER_USER:
                raise AuthError(
                    f"{user} has {len(taken)} app passwords, the most one user may have; "
                    "revoke some first"
                )
            await conn.execute(
                "INSERT INTO popbox_credentials (name, kind, label, key_id, secret, created) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (user, KIND_APP, label, key_id, secret, int(time.time())),
            )
        return password

    async def list_app_passwords(self, user: str) -> list[AppPassword]:
        validate_username(user)
        rows = await self.tables.fetch_all(
            "SELECT label, key_id, secret, created FROM popbox_credentials "
            "WHERE name = %s AND kind = 'app' ORDER BY label",
            (user,),
            "list app passwords",
        )
        return [
            AppPassword(user, label, key_id, secret, int(made))
            for label, key_id, secret, made in rows
        ]

    async def revoke_app_password(self, user: str, label: str) -> None:
        validate_username(user)
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, "revoke an app password") as conn:
            cursor = await conn.execute(
                "DELETE FROM popbox_credentials WHERE name = %s AND kind = 'app' AND label = %s",
                (user, label),
            )
            if cursor.rowcount == 0:
                raise NoSuchCredential(f"{user} has no app password labelled {label}")

    async def set_apop_secret(self, user: str, secret: str | None = None) -> str:
        validate_username(user)
        secret = secret if secret is not None else generate_apop_secret()
        stored = stored_password(secret, "PLAIN", DEFAULT_COST)
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, "set an APOP secret") as conn:
            await self._lock_user(conn, user)
            await conn.execute(
                _UPSERT_CREDENTIAL, (user, KIND_APOP, KIND_APOP, "", stored, int(time.time()))
            )
        return secret

    # -- the import ------------------------------------------------------------------

    async def import_passwd(self, passwd: Path, credentials: Path | None = None) -> ImportReport:
        """Copy the users of ``passwd`` (and the app passwords and APOP secrets of
        ``credentials``, when it exists) into the tables; see the module docstring."""
        entries, skipped = await asyncio.to_thread(_read_passwd, passwd)
        side = await asyncio.to_thread(_read_side, credentials)
        report = ImportReport(skipped=skipped)
        pool = await self.tables.pool()
        async with transaction(pool, AuthError, f"import {passwd}") as conn:
            for entry in entries:
                assert entry.fields is not None  # read from a line
                outcome = await self._upsert(conn, _UPSERT_USER, _row(entry.fields))
                report.added += outcome == "added"
                report.updated += outcome == "updated"
                report.unchanged += outcome == "unchanged"
            names = {entry.record.name for entry in entries}
            for user, values in side:
                if user not in names:
                    report.credentials_skipped += 1
                    continue
                outcome = await self._upsert(conn, _UPSERT_CREDENTIAL, values)
                report.credentials_added += outcome == "added"
                report.credentials_updated += outcome == "updated"
                report.credentials_unchanged += outcome == "unchanged"
        return report

    async def _upsert(self, conn: AsyncConnection[Any], query: str, values: Sequence[Any]) -> str:
        row = await (await conn.execute(query, values)).fetchone()
        if row is None:
            return "unchanged"
        return "added" if row[0] else "updated"


def _read_passwd(path: Path) -> tuple[list[PasswdEntry], int]:
    """The users of the passwd file, and how many of its lines are none (blocking)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    entries = list(parse_passwd(data, source=str(path)).values())
    candidates = 0
    for raw in data.split(b"\n"):
        try:
            candidates += split_line(raw.decode("utf-8", "replace")) is not None
        except ValueError:
            candidates += 1
    return entries, candidates - len(entries)


def _read_side(path: Path | None) -> list[tuple[str, tuple[Any, ...]]]:
    """The side file's credentials as rows (user, values); [] without one (blocking)."""
    if path is None:
        return []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AuthError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    rows: list[tuple[str, tuple[Any, ...]]] = []
    for user, found in parse_credentials(data, source=str(path)).items():
        for app in found.apps.values():
            rows.append((user, (user, KIND_APP, app.label, app.key_id, app.hashed, app.created)))
        if found.apop is not None:
            stored = "{PLAIN}" + found.apop
            rows.append((user, (user, KIND_APOP, KIND_APOP, "", stored, 0)))
    return rows
