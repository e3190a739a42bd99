"""Login brokering: from a login event to an open maildrop, or to the refusal to send.

The one crossing from the login world (net.login, which sees only the PassDB) into the
mail world: the address's penalty is served, the login name is read (net.login_target:
mailbox, folder, device, member), the login user's password is checked, a member's
right to the shared mailbox too, the mailbox's user takes one of their session slots,
and only then does a verified name reach the store, with the view the name asked for.

Whatever can be guessed is refused alike: a wrong password, an unknown user, a name
that can be no login, a login from outside the user's ``allow_nets``, and a member
login by someone the mailbox is not shared with all get the same ``-ERR [AUTH]``,
after the same failure delay, and count against the address. The other restrictions
of the user database's extra fields (auth.restrictions) come after a right password:
``nologin`` answers with its reason, ``proxy``/``host`` with a permanent refusal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from typing import Final

from popbox.auth.base import PassDB, UserRecord
from popbox.auth.restrictions import LoginRefusal, RefusalKind, login_refusal
from popbox.config import LimitSettings, MailboxSettings
from popbox.errors import (
    AuthError,
    InvalidMailboxName,
    LoginTooSoon,
    MaildropInUse,
    NoSuchFolder,
    PermanentStoreError,
    StoreError,
)
from popbox.net.limits import AuthPenalty
from popbox.net.login import (
    TEXT_AUTH_FAILED,
    TEXT_AUTH_UNAVAILABLE,
    LoginEvent,
    VerifiedLogin,
    authenticate,
    fail_slowly,
)
from popbox.net.login_names import LoginGrammar
from popbox.net.login_target import read_login
from popbox.proto.events import LoginRequest
from popbox.proto.replies import (
    CODE_AUTH,
    CODE_IN_USE,
    CODE_LOGIN_DELAY,
    CODE_SYS_PERM,
    CODE_SYS_TEMP,
)
from popbox.store.base import Maildrop, MailStore
from popbox.store.mailbox import MailboxView

__all__ = ["Admitted", "LoginBroker", "Refused"]

log = logging.getLogger("popbox.pop3")

# RFC 3206: IN-USE is for "already in use"; Dovecot says the same for its per-user cap.
TOO_MANY_USER_SESSIONS: Final = "Too many sessions for this user."
# The name checked for a login name that can be no login: no user has it (auth.names),
# so the check runs, and fails, exactly as for an unknown user.
_NO_USER: Final = ""
# The answer to a right password for an account the user database sends elsewhere
# (Dovecot's proxy or login referral, which popbox does not do).
TEXT_NOT_SERVED: Final = "This account is not served here."


class Admitted:
    """A verified login with its maildrop open; ``user`` holds one session slot.

    ``user`` is the mailbox's user, ``login`` the user whose password opened it (a
    member of a shared mailbox, or ``user``), ``view`` what the login asked for.
    """

    # A plain class: a frozen dataclass costs twice as much to make, once per login.
    __slots__ = ("login", "maildrop", "user", "view")

    def __init__(self, user: str, login: str, view: MailboxView, maildrop: Maildrop) -> None:
        self.user = user
        self.login = login
        self.view = view
        self.maildrop = maildrop


class Refused:
    """The login failed: the response code and text for ``conn.login_failed``."""

    __slots__ = ("code", "text")

    def __init__(self, code: str, text: str) -> None:
        self.code = code
        self.text = text


class LoginBroker:
    """Logs sessions in, for every session of one service (it holds nothing per session
    but the count of each mailbox user's sessions, for ``max_sessions_per_user``)."""

    def __init__(
        self,
        passdb: PassDB,
        store: MailStore,
        penalty: AuthPenalty,
        limits: LimitSettings,
        mailbox: MailboxSettings,
    ) -> None:
        """ValueError (naming the setting) for separators that make names ambiguous."""
        self._passdb = passdb
        self._store = store
        self._penalty = penalty
        self._limits = limits
        self._mailbox = mailbox
        self._grammar = LoginGrammar(
            device_separator=mailbox.device_separator,
            folder_separator=mailbox.folder_separator,
            master_separator=mailbox.master_separator,
            recent_prefix=mailbox.recent_prefix,
        )
        # Sessions per mailbox user, for users with at least one.
        self.per_user: dict[str, int] = {}

    async def login_owner(self, text: str, authzid: str = "") -> str | None:
        """The user whose credentials the login name ``text`` (with SASL's ``authzid``)
        must prove, as ``log_in`` will read it; None when it can be no login.
        AuthError when the database cannot be asked."""
        name, _ = await read_login(self._grammar, self._passdb, LoginRequest(text, "", "", authzid))
        return name.login if name is not None else None

    async def serve_penalty(self, ip: str) -> None:
        """Wait out ``ip``'s penalty for failed logins (before any credential work)."""
        penalty = self._penalty.delay(ip)
        if penalty > 0:
            await asyncio.sleep(penalty)

    async def refuse(self, ip: str, code: str) -> None:
        """A login that failed after its credentials were looked at: a wrong guess
        (``code`` AUTH) waits the failure delay and counts against ``ip``."""
        if code == CODE_AUTH:
            await fail_slowly(self._limits.auth_failure_delay)
            self._penalty.failed(ip)

    async def log_in(
        self,
        event: LoginEvent,
        *,
        ip: str,
        session_id: str,
        real_ip: str | None,
    ) -> Admitted | Refused:
        """Check ``event``'s credentials from ``ip`` and open the maildrop it names.

        ``real_ip`` is the connection's own peer (allow_real_nets): ``ip`` itself
        unless ``ip`` came from a PROXY header; None when it is not known.
        On ``Admitted`` the caller holds a session slot of the mailbox's user and gives
        it back with ``release_user`` when the session ends.
        """
        limits = self._limits
        # Before the check, so a penalised address costs no hashing either (a SASL
        # exchange the glue ran has served it before its first step).
        if not isinstance(event, VerifiedLogin):
            await self.serve_penalty(ip)
        try:
            name, mailbox = await read_login(self._grammar, self._passdb, event)
        except AuthError as exc:
            log.warning("session=%s user database unavailable: %s", session_id, exc, exc_info=exc)
            return Refused(CODE_SYS_TEMP, TEXT_AUTH_UNAVAILABLE)
        wanted = name.login if name is not None else _NO_USER
        checked = event if wanted == event.username else dataclasses.replace(event, username=wanted)
        outcome = await authenticate(
            self._passdb, checked, failure_delay=limits.auth_failure_delay, session_id=session_id
        )
        if outcome.record is None or name is None:
            if outcome.code == CODE_AUTH:
                self._penalty.failed(ip)
            return Refused(outcome.code, outcome.text)
        login = outcome.record.name
        refusal = login_refusal(outcome.record.extra, ip=ip, real_ip=real_ip)
        if refusal is not None:
            return await self._refuse_restricted(outcome.record, refusal, ip, session_id)
        if outcome.record.credential is not None:
            log.info(
                "session=%s login=%s with app password %s",
                session_id, login, outcome.record.credential,
            )
        elif isinstance(event, VerifiedLogin) and event.credential:
            log.info(
                "session=%s login=%s by %s with %s",
                session_id, login, event.mechanism, event.credential,
            )
        if name.shared:
            if mailbox is None or login not in self._mailbox.shared_with(mailbox.extra):
                # The same refusal as a wrong password: whether the mailbox exists or
                # the password was right stays unsaid.
                log.info(
                    "session=%s login=%s refused: %s is not shared with them",
                    session_id, login, name.mailbox,
                )
                await self.refuse(ip, CODE_AUTH)
                return Refused(CODE_AUTH, TEXT_AUTH_FAILED)
            # The device is named after the member as the user database spells them.
            device = login + name.device[len(name.login) :]
        else:
            mailbox, device = outcome.record, name.device
        self._penalty.succeeded(ip)
        user = mailbox.name
        view = MailboxView(
            name.folder,
            device,
            name.recent,
            policy=self._mailbox.policy_for(mailbox.extra, user=user),
        )
        return await self._open(user, login, view, session_id)

    async def _refuse_restricted(
        self, record: UserRecord, refusal: LoginRefusal, ip: str, session_id: str
    ) -> Refused:
        """Refuse a right password that the user's extra fields do not let in."""
        log.info(
            "session=%s login=%s refused by the %s field%s",
            session_id, record.name, refusal.field,
            f": {refusal.detail}" if refusal.detail else "",
        )
        if refusal.kind is RefusalKind.AS_WRONG_PASSWORD:
            await self.refuse(ip, CODE_AUTH)
            return Refused(CODE_AUTH, TEXT_AUTH_FAILED)
        if refusal.kind is RefusalKind.NOLOGIN:
            # Dovecot: "-ERR [AUTH] reason"; the password was right, so no penalty.
            return Refused(CODE_AUTH, refusal.reason or TEXT_AUTH_FAILED)
        return Refused(CODE_SYS_PERM, TEXT_NOT_SERVED)

    async def _open(
        self, user: str, login: str, view: MailboxView, session_id: str
    ) -> Admitted | Refused:
        """Take a session slot of ``user`` and open the maildrop ``view`` asks for."""
        if not self._claim_user(user):
            log.info(
                "session=%s user=%s refused: max_sessions_per_user (%d) reached",
                session_id, user, self._limits.max_sessions_per_user,
            )
            return Refused(CODE_IN_USE, TOO_MANY_USER_SESSIONS)
        try:
            maildrop = await self._store.open_maildrop(user, view)
        except StoreError as exc:
            expected = isinstance(exc, MaildropInUse | LoginTooSoon | NoSuchFolder)
            log.log(
                logging.INFO if expected else logging.ERROR,
                "session=%s user=%s device=%s folder=%s cannot open maildrop: %s",
                session_id, user, view.device, view.folder, exc,
                exc_info=None if expected else exc,
            )
            self.release_user(user)
            return Refused(*_store_failure(exc, view))
        except BaseException:
            self.release_user(user)
            raise
        return Admitted(user, login, view, maildrop)

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


def _store_failure(exc: StoreError, view: MailboxView) -> tuple[str, str]:
    """The response code and text for a store that failed at login (RFC 2449, 3206)."""
    if isinstance(exc, MaildropInUse):
        return CODE_IN_USE, "Maildrop is locked by another session."
    if isinstance(exc, LoginTooSoon):
        # Not a failed login: the client is told to come back, not that it guessed wrong.
        wait = max(1, math.ceil(exc.retry_after))
        return CODE_LOGIN_DELAY, f"Logged in too recently, try again in {wait} seconds."
    if isinstance(exc, NoSuchFolder):
        return CODE_SYS_PERM, f"Folder {view.folder} does not exist."
    if isinstance(exc, InvalidMailboxName):
        # The store refused a name the login grammar let through: a bad login name.
        return CODE_AUTH, TEXT_AUTH_FAILED
    if isinstance(exc, PermanentStoreError):
        return CODE_SYS_PERM, "Maildrop cannot be opened."
    return CODE_SYS_TEMP, "Maildrop is temporarily unavailable, try again later."
