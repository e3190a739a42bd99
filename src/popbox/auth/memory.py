"""An in-memory user database for tests: plaintext passwords (and APOP secrets) in dicts."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping

from popbox.auth.base import UserRecord

__all__ = ["MemoryPassDB"]


class MemoryPassDB:
    """Users and plaintext passwords held in memory."""

    def __init__(
        self,
        passwords: Mapping[str, str],
        records: Mapping[str, UserRecord] | None = None,
        apop_secrets: Mapping[str, str] | None = None,
    ) -> None:
        """``apop_secrets``: the users' APOP secrets (none by default: no APOP)."""
        self._passwords = dict(passwords)
        self._records = dict(records or {})
        self._apop_secrets = dict(apop_secrets or {})

    def set_password(self, username: str, password: str) -> None:
        self._passwords[username] = password

    def _record(self, username: str) -> UserRecord:
        return self._records.get(username) or UserRecord(name=username)

    async def verify(self, username: str, password: str) -> UserRecord | None:
        await asyncio.sleep(0)
        expected = self._passwords.get(username)
        # Compare against a dummy for unknown users so the work is the same.
        ok = hmac.compare_digest(
            (expected if expected is not None else "\0unknown").encode(), password.encode()
        )
        return self._record(username) if ok and expected is not None else None

    def users(self) -> list[UserRecord]:
        return [self._record(username) for username in self._passwords]

    async def lookup(self, username: str) -> UserRecord | None:
        return self._record(username) if username in self._passwords else None

    async def plaintext_secret(self, username: str) -> str | None:
        return self._apop_secrets.get(username) if username in self._passwords else None
