"""Login brokering: from a login event to an open maildrop, or to the refusal to send.

The one crossing from the login world (net.login, which sees only the PassDB) into the
mail world: the address's penalty is served, the credentials are checked, the user
takes one of their session slots, and only then does a verified name reach the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from popbox.auth.base import PassDB
from popbox.config import LimitSettings
from popbox.errors import MaildropInUse, PermanentStoreError, StoreError
from popbox.net.limits import AuthPenalty
from popbox.net.login import authenticate
from popbox.proto.events import ApopRequest, LoginRequest
from popbox.proto.replies import CODE_AUTH, CODE_IN_USE, CODE_SYS_PERM, CODE_SYS_TEMP
from popbox.store.base import Maildrop, MailStore

__all__ = ["Admitted", "LoginBroker", "Refused"]

log = logging.getLogger("popbox.pop3")

# RFC 3206: IN-USE is for "already in use"; Dovecot says the same for its per-user cap.
TOO_MANY_USER_SESSIONS: Final = "Too many sessions for this user."


class Admitted:
    """A verified user with their maildrop open; the user holds one session slot."""

    # A plain class: a frozen dataclass costs twice as much to make, once per login.
    __slots__ = ("maildrop", "user")

    def __init__(self, user: str, maildrop: Maildrop) -> None:
        self.user = user
        self.maildrop = maildrop


class Refused:
    """The login failed: the response code and text for ``conn.login_failed``."""

    __slots__ = ("code", "text")

    def __init__(self, code: str, text: str) -> None:
        self.code = code
        self.text = text


class LoginBroker:
    """Logs sessions in, for every session of one service (it holds nothing per session
    but the count of each logged-in user's sessions, for ``max_sessions_per_user``)."""

    def __init__(
        self, passdb: PassDB, store: MailStore, penalty: AuthPenalty, limits: LimitSettings
    ) -> None:
        self._passdb = passdb
        self._store = store
        self._penalty = penalty
        self._limits = limits
        # Sessions per user, for users with at least one.
        self.per_user: dict[str, int] = {}

    async def log_in(
        self, event: LoginRequest | ApopRequest, *, ip: str, session_id: str
    ) -> Admitted | Refused:
        """Check ``event``'s credentials from ``ip`` and open the user's maildrop.

        On ``Admitted`` the caller holds a session slot of the user and gives it back
        with ``release_user`` when the session ends.
        """
        limits = self._limits
        penalty = self._penalty.delay(ip)
        if penalty > 0:
            # Before the check, so a penalised address costs no hashing either.
            await asyncio.sleep(penalty)
        outcome = await authenticate(
            self._passdb, event, failure_delay=limits.auth_failure_delay, session_id=session_id
        )
        if outcome.user is None:
            if outcome.code == CODE_AUTH:
                self._penalty.failed(ip)
            return Refused(outcome.code, outcome.text)
        user = outcome.user
        self._penalty.succeeded(ip)
        if not self._claim_user(user):
            log.info(
                "session=%s user=%s refused: max_sessions_per_user (%d) reached",
                session_id, user, limits.max_sessions_per_user,
            )
            return Refused(CODE_IN_USE, TOO_MANY_USER_SESSIONS)
        try:
            maildrop = await self._store.open_maildrop(user)
        except StoreError as exc:
            log.log(
                logging.INFO if isinstance(exc, MaildropInUse) else logging.ERROR,
                "session=%s user=%s cannot open maildrop: %s",
                session_id, user, exc,
                exc_info=None if isinstance(exc, MaildropInUse) else exc,
            )
            self.release_user(user)
            return Refused(*_store_failure(exc))
        except BaseException:
            self.release_user(user)
            raise
        return Admitted(user, maildrop)

    def release_user(self, user: str) -> None:
        """Give back a session slot of ``user`` taken by an ``Admitted`` login."""
        count = self.per_user.get(user, 0) - 1
        if count > 0:
            self.per_user[user] = count
        else:
            self.per_user.pop(user, None)

    def _claim_user(self, user: str) -> bool:
        """Take one of ``user``'s session slots; False when they are all taken."""
        count = self.per_user.get(user, 0)
        if count >= self._limits.max_sessions_per_user:
            return False
        self.per_user[user] = count + 1
        return True


def _store_failure(exc: StoreError) -> tuple[str, str]:
    """The response code and text for a store that failed at login (RFC 3206)."""
    if isinstance(exc, MaildropInUse):
        return CODE_IN_USE, "Maildrop is locked by another session."
    if isinstance(exc, PermanentStoreError):
        return CODE_SYS_PERM, "Maildrop cannot be opened."
    return CODE_SYS_TEMP, "Maildrop is temporarily unavailable, try again later."
