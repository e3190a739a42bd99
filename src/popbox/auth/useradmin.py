"""What `popbox user` asks of a user database, whichever it is: the UserAdmin protocol,
and its passwd-file implementation over auth.admin's edits (the PostgreSQL one is
auth.postgresql_admin).

Both keep the same rules: a name is checked before anything is written, a password is
hashed as the passwd file would hold it, a user's app passwords and APOP secret go
with them, and a refusal is an AuthError that says why (UserExists, NoSuchUser,
NoSuchCredential).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from popbox.auth import admin
from popbox.auth.base import UserRecord
from popbox.auth.credentials import AppPassword
from popbox.auth.schemes import DEFAULT_COST, DEFAULT_SCHEME, HashCost

__all__ = ["PasswdFileUserAdmin", "UserAdmin"]


class UserAdmin(Protocol):
    """Edits of one user database; ``where`` names it in messages."""

    @property
    def where(self) -> str: ...

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
        """Add ``name`` with a new hash of ``password``; UserExists if present."""
        ...

    async def set_password(
        self,
        name: str,
        password: str,
        *,
        scheme: str = DEFAULT_SCHEME,
        cost: HashCost = DEFAULT_COST,
    ) -> None:
        """Replace ``name``'s password hash; NoSuchUser if absent."""
        ...

    async def delete_user(self, name: str) -> None:
        """Remove ``name`` with their app passwords and APOP secret (not their mail)."""
        ...

    async def set_quota(self, name: str, messages: int | None, octets: int | None) -> None:
        """Set ``name``'s quota (None: the configured default; 0: no limit)."""
        ...

    async def list_users(self) -> list[UserRecord]:
        """Every user (the passwd file's order; by name in a table)."""
        ...

    async def find_user(self, name: str) -> UserRecord | None:
        """``name``'s record, None if there is no such user."""
        ...

    async def add_app_password(
        self, user: str, label: str, *, scheme: str = DEFAULT_SCHEME, cost: HashCost = DEFAULT_COST
    ) -> str:
        """A new app password labelled ``label``, returned once (only its hash is kept)."""
        ...

    async def list_app_passwords(self, user: str) -> list[AppPassword]:
        """``user``'s app passwords, by label."""
        ...

    async def revoke_app_password(self, user: str, label: str) -> None:
        """Remove ``user``'s app password ``label``; NoSuchCredential if none."""
        ...

    async def set_apop_secret(self, user: str, secret: str | None = None) -> str:
        """Give ``user`` a new APOP secret (generated unless given) and return it."""
        ...

    async def close(self) -> None: ...


class PasswdFileUserAdmin:
    """UserAdmin over a passwd file and its side file (auth.admin does the edits, in
    a thread: they lock and fsync files)."""

    def __init__(self, passwd: Path, credentials: Path) -> None:
        self._passwd = passwd
        self._credentials = credentials

    @property
    def where(self) -> str:
        return str(self._passwd)

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
        return await asyncio.to_thread(
            lambda: admin.add_user(
                self._passwd,
                name,
                password,
                scheme=scheme,
                quota_messages=quota_messages,
                quota_octets=quota_octets,
                cost=cost,
            )
        )

    async def set_password(
        self,
        name: str,
        password: str,
        *,
        scheme: str = DEFAULT_SCHEME,
        cost: HashCost = DEFAULT_COST,
    ) -> None:
        await asyncio.to_thread(
            lambda: admin.set_password(self._passwd, name, password, scheme=scheme, cost=cost)
        )

    async def delete_user(self, name: str) -> None:
        await asyncio.to_thread(admin.delete_user, self._passwd, name)
        await asyncio.to_thread(admin.remove_credentials, self._credentials, name)

    async def set_quota(self, name: str, messages: int | None, octets: int | None) -> None:
        await asyncio.to_thread(admin.set_quota, self._passwd, name, messages, octets)

    async def list_users(self) -> list[UserRecord]:
        return await asyncio.to_thread(admin.list_users, self._passwd)

    async def find_user(self, name: str) -> UserRecord | None:
        found = [record for record in await self.list_users() if record.name == name]
        return found[0] if found else None

    async def add_app_password(
        self, user: str, label: str, *, scheme: str = DEFAULT_SCHEME, cost: HashCost = DEFAULT_COST
    ) -> str:
        return await asyncio.to_thread(
            lambda: admin.add_app_password(self._credentials, user, label, scheme=scheme, cost=cost)
        )

    async def list_app_passwords(self, user: str) -> list[AppPassword]:
        return await asyncio.to_thread(admin.list_app_passwords, self._credentials, user)

    async def revoke_app_password(self, user: str, label: str) -> None:
        await asyncio.to_thread(admin.revoke_app_password, self._credentials, user, label)

    async def set_apop_secret(self, user: str, secret: str | None = None) -> str:
        return await asyncio.to_thread(admin.set_apop_secret, self._credentials, user, secret)

    async def close(self) -> None:
        return None
