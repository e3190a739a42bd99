"""An in-memory user database for tests: passwords in a dict, as they are or as stored
``{SCHEME}`` values (a ``{SCRAM-SHA-256}`` key, say), and APOP secrets."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping

from popbox.auth.base import SCRAM_HASHES, ScramCredentials, UserRecord
from popbox.auth.schemes import scram_credentials_of, verify_password
from popbox.auth.scram import DEFAULT_SCRAM_ITERATIONS, fake_credentials

__all__ = ["MemoryPassDB"]


class MemoryPassDB:
    """Users and their passwords held in memory.

    A password is the plaintext itself; ``stored`` adds users by a stored value
    instead (``{SCRAM-SHA-256}...``, ``{ARGON2ID}...``), which SCRAM uses as the passwd
    file does and PLAIN logins verify against.
    """

    def __init__(
        self,
        passwords: Mapping[str, str],
        records: Mapping[str, UserRecord] | None = None,
        *,
        stored: Mapping[str, str] | None = None,
        apop_secrets: Mapping[str, str] | None = None,
    ) -> None:
        """``stored``: users with a stored ``{SCHEME}`` value instead of a password;
        ``apop_secrets``: the users' APOP secrets (none by default: no APOP)."""
        self._passwords = dict(passwords)
        self._records = dict(records or {})
        self._stored = dict(stored or {})
        self._apop_secrets = dict(apop_secrets or {})

    def set_password(self, username: str, password: str) -> None:
        self._passwords[username] = password

    def _record(self, username: str) -> UserRecord:
        return self._records.get(username) or UserRecord(name=username)

    async def verify(self, username: str, password: str) -> UserRecord | None:
        await asyncio.sleep(0)
        if username in self._stored:
            ok = await asyncio.to_thread(verify_password, password, self._stored[username])
            return self._record(username) if ok else None
        expected = self._passwords.get(username)
        # Compare against a dummy for unknown users so the work is the same.
        ok = hmac.compare_digest(
            (expected if expected is not None else "\0unknown").encode(), password.encode()
        )
        return self._record(username) if ok and expected is not None else None

    def users(self) -> list[UserRecord]:
        return [self._record(username) for username in (*self._passwords, *self._stored)]

    async def lookup(self, username: str) -> UserRecord | None:
        known = username in self._passwords or username in self._stored
        return self._record(username) if known else None

    async def plaintext_secret(self, username: str) -> str | None:
        return self._apop_secrets.get(username) if username in self._passwords else None

    async def scram_credentials(self, username: str, hash_name: str) -> ScramCredentials:
        if hash_name not in SCRAM_HASHES:
            raise ValueError(f"not a SCRAM hash: {hash_name!r}")
        iterations = DEFAULT_SCRAM_ITERATIONS
        if username in self._stored:
            stored = self._stored[username]
        elif username in self._passwords:
            stored = "{PLAIN}" + self._passwords[username]
        else:
            return fake_credentials(
                username, hash_name, iterations=iterations, problem="unknown user"
            )
        found = await asyncio.to_thread(
            scram_credentials_of, stored, hash_name, username=username, iterations=iterations
        )
        if isinstance(found, ScramCredentials):
            return found
        return fake_credentials(username, hash_name, iterations=iterations, problem=found)
