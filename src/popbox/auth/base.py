"""The authentication plug-in point: who may log in, and what we know of them.

Every way of logging in with a password (USER/PASS, SASL PLAIN and LOGIN, APOP) ends
in the same ``PassDB.verify`` call, so there is one place that decides and one timing
profile. SCRAM, which never sees the password, asks ``scram_credentials`` for the
keys it checks the client's proof with; unknown users get fakes there, as they get a
dummy hash in ``verify``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

__all__ = [
    "SCRAM_HASHES",
    "CachedUsers",
    "ClosingPassDB",
    "PassDB", "ScramCredentials",
    "UserDirectory",
    "UserRecord",
]

# The SCRAM families a user database may be asked for (RFC 5802's SHA-1, RFC 7677's
# SHA-256), named as the stored schemes are: a {SCRAM-SHA-256} key serves both
# SCRAM-SHA-256 and SCRAM-SHA-256-PLUS.
SCRAM_HASHES: Final = ("SCRAM-SHA-256", "SCRAM-SHA-1")


@dataclass(frozen=True, slots=True)
class UserRecord:
    """What the user database knows about one user, minus the password hash.

    ``quota_messages`` and ``quota_octets`` are None where no per-user rule exists
    (the configured default then applies). ``extra`` keeps every other extra field
    (Dovecot's ``key=value`` fields): the login restrictions (auth.restrictions), the
    mailbox policy, the ``mail`` location. ``home`` is the home directory ("" for
    none). ``credential`` is set only on what ``verify`` returns: the label of the app
    password that matched, or None for the user's own password.
    """

    name: str
    quota_messages: int | None = None
    quota_octets: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    home: str = ""
    credential: str | None = None


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """What a SCRAM server needs of one user (RFC 5802 section 3): the salt and
    iteration count it sends, and the keys it checks the proof and signs with.

    ``problem`` is "" for the user's own keys. Otherwise the keys are fakes (an unknown
    user, or a password hash SCRAM cannot use) and ``problem`` says why, for the log:
    the exchange runs to its end and fails as a wrong password does, so SCRAM tells
    nobody which names exist.
    """

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    problem: str = ""


class PassDB(Protocol):
    """A user database.

    ``verify`` must do the same work and take the same time for an unknown user as
    for a wrong password, so that replies do not reveal which names exist. Hashing
    runs off the event loop.
    """

    async def verify(self, username: str, password: str) -> UserRecord | None:
        """Return the user if the password is right, None otherwise.

        The user's own password or one of their app passwords is right; the record
        returned names the app password's label in ``credential``. Login restrictions
        in the extra fields (``allow_nets``, ``nologin``, ...) are the caller's to
        apply (auth.restrictions): they need the client's address.

        Raises AuthError only when the database itself cannot be consulted.
        """
        ...

    async def lookup(self, username: str) -> UserRecord | None:
        """Return the user without checking a password (delivery, quotas)."""
        ...

    async def plaintext_secret(self, username: str) -> str | None:
        """The user's APOP secret (RFC 1939 section 7), a secret of its own that is
        never the login password; None for a user who has none (no APOP for them)."""
        ...

    async def scram_credentials(self, username: str, hash_name: str) -> ScramCredentials:
        """``username``'s SCRAM credentials for ``hash_name`` (one of SCRAM_HASHES):
        from a stored ``{SCRAM-*}`` key of that hash, derived from a ``{PLAIN}``
        password; for anyone else fakes that look and cost the same (``problem`` set).

        Raises AuthError only when the database itself cannot be consulted.
        """
        ...


@runtime_checkable
class UserDirectory(Protocol):
    """A user database that can list its users (the passwd file can; a large SQL one
    need not). The server reads the users' own policy values from it for what CAPA
    announces before login (RFC 2449's bounds over every user)."""

    def users(self) -> list[UserRecord]:
        """Every user, as last loaded. May block (reads the file): run it in a thread."""
        ...


@runtime_checkable
class CachedUsers(Protocol):
    """A user database that keeps its users in memory (the passwd file does): the
    store's mail location reads a user's home and ``mail`` field from it at every
    login and delivery, on the event loop."""

    def cached_record(self, username: str) -> UserRecord | None:
        """The user as last loaded; no I/O (a lookup or verify loads changes)."""
        ...


@runtime_checkable
class ClosingPassDB(Protocol):
    """A user database that holds connections (PostgreSQL's pool): whoever built it
    closes it when done (the server at shutdown, a command at its end)."""

    async def close(self) -> None: ...
