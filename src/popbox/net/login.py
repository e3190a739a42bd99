"""The login stage: turns a login event into a user name or a refusal, seeing only the PassDB.

Pre-auth code never touches mail (Dovecot's split between pop3-login and pop3): this
module cannot reach a store, and the transaction stage cannot reach credentials.
USER/PASS, SASL PLAIN/LOGIN and APOP all end here, in one place with one failure path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from typing import Final, TypeAlias

from popbox.auth.base import PassDB, UserRecord
from popbox.errors import AuthError
from popbox.proto.events import ApopRequest, LoginRequest
from popbox.proto.replies import CODE_AUTH, CODE_SYS_TEMP
from popbox.proto.sasl import apop_digest

__all__ = [
    "TEXT_AUTH_FAILED",
    "TEXT_AUTH_UNAVAILABLE",
    "AuthOutcome",
    "LoginEvent",
    "VerifiedLogin",
    "authenticate",
    "fail_slowly",
]

log = logging.getLogger("popbox.pop3")

# One wording for unknown user and wrong password, so replies reveal no names.
TEXT_AUTH_FAILED: Final = "Authentication failed."
TEXT_AUTH_UNAVAILABLE: Final = "Authentication is temporarily unavailable, try again later."
# APOP for an unknown user is compared against this so the work matches a real check.
_UNKNOWN_USER_SECRET: Final = "\0no such user\0"  # noqa: S105 - never matches a digest


@dataclass(frozen=True, slots=True)
class VerifiedLogin:
    """A login whose credentials a glue-run SASL mechanism (net.sasl) has checked:
    only the user's record is left to look up."""

    username: str
    mechanism: str
    authzid: str = ""
    credential: str = ""
    """What proved it, for the log ("" for the password itself)."""


LoginEvent: TypeAlias = LoginRequest | ApopRequest | VerifiedLogin


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The result of one login attempt: the user's record, or a code and text."""

    record: UserRecord | None
    code: str = CODE_AUTH
    text: str = TEXT_AUTH_FAILED

    @property
    def user(self) -> str | None:
        """The canonical user name (None if the attempt failed)."""
        return self.record.name if self.record is not None else None

    @property
    def ok(self) -> bool:
        return self.record is not None


async def authenticate(
    passdb: PassDB,
    event: LoginEvent,
    *,
    failure_delay: float,
    session_id: str,
) -> AuthOutcome:
    """Check the credentials of ``event``; on a bad password wait ``failure_delay`` first.

    The delay (Dovecot's auth_failure_delay) is served before the -ERR so that a
    guesser on one connection gets a few tries a minute. A database that cannot be
    consulted is our fault: [SYS/TEMP], no delay, and not counted as a failure.
    """
    try:
        if isinstance(event, ApopRequest):
            record = await _verify_apop(passdb, event)
        elif isinstance(event, VerifiedLogin):
            # The mechanism checked the credentials; a user gone since is refused.
            record = await passdb.lookup(event.username)
        else:
            record = await passdb.verify(event.username, event.password)
    except AuthError as exc:
        log.warning("session=%s user database unavailable: %s", session_id, exc, exc_info=exc)
        return AuthOutcome(None, CODE_SYS_TEMP, TEXT_AUTH_UNAVAILABLE)
    if record is None:
        await fail_slowly(failure_delay)
        return AuthOutcome(None)
    return AuthOutcome(record)


async def fail_slowly(failure_delay: float) -> None:
    """Serve the failure delay: every refusal that stands for a wrong password waits it."""
    if failure_delay > 0:
        await asyncio.sleep(failure_delay)


async def _verify_apop(passdb: PassDB, event: ApopRequest) -> UserRecord | None:
    """APOP (RFC 1939 section 7): MD5 of timestamp + shared secret, compared in constant time."""
    secret = await passdb.plaintext_secret(event.username)
    expected = apop_digest(event.timestamp, secret if secret is not None else _UNKNOWN_USER_SECRET)
    matches = hmac.compare_digest(expected.encode(), event.digest.lower().encode())
    if not matches or secret is None:
        return None
    return await passdb.lookup(event.username)
