"""Server-side sessions of the web page: a bounded in-memory table keyed by a random token.

The browser holds only the token, in the ``popbox_session`` cookie (HttpOnly,
SameSite=Strict, Secure unless ``web.secure_cookies`` is off, Path=/). Everything else
(who, whether an admin, the CSRF token, when it began and was last used) stays here,
so a session ends the moment it is dropped: at logout, at idle or absolute expiry
(``web.session_idle``, ``web.session_lifetime``, OWASP's session guidance), when an
admin removes the user or sets their password, and when the table is full and it is
the one used least recently. A login always gets a new token (no fixation), and the
table lives in one process: a restart logs everyone out, which is the safe failure.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "COOKIE_NAME",
    "MAX_SESSIONS",
    "TOKEN_BYTES",
    "Session",
    "SessionTable",
    "new_token",
    "tokens_match",
]

COOKIE_NAME: Final = "popbox_session"
# 256 bits from the OS's CSPRNG: OWASP asks for at least 64 bits of entropy.
TOKEN_BYTES: Final = 32
# At a few hundred bytes a session, 10,000 are a few MiB; a site with more people
# logged in at once than that is past what one in-memory table should serve.
MAX_SESSIONS: Final = 10_000
# What a cookie holding a token can be: token_urlsafe(32) is 43 characters.
MAX_TOKEN_LENGTH: Final = 64


def new_token() -> str:
    """A fresh random token (session ids and CSRF tokens alike)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def tokens_match(given: str, expected: str) -> bool:
    """Compare tokens in constant time (a timing side channel reveals nothing)."""
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(slots=True)
class Session:
    """One logged-in browser: its user, its rights and its CSRF token."""

    token: str
    user: str
    admin: bool
    csrf: str
    created: float
    last_used: float


class SessionTable:
    """Every live session, oldest use first; bounded by ``max_sessions``."""

    def __init__(
        self,
        *,
        idle: float,
        lifetime: float,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle = idle
        self._lifetime = lifetime
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self, user: str, *, admin: bool) -> Session:
        """A new session for ``user`` under a new token (the caller drops the old one)."""
        now = self._clock()
        self._expire(now)
        session = Session(new_token(), user, admin, new_token(), now, now)
        self._sessions[session.token] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session

    def find(self, token: str | None) -> Session | None:
        """The live session of ``token``, its use noted; None if there is none (any
        more): unknown, idle too long, or past its lifetime."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        now = self._clock()
        if self._expired(session, now):
            del self._sessions[token]
            return None
        session.last_used = now
        self._sessions.move_to_end(token)
        return session

    def end(self, token: str) -> None:
        """Drop one session (logout). Dropping one that is gone is harmless."""
        self._sessions.pop(token, None)

    def end_user(self, user: str) -> int:
        """Drop every session of ``user`` (removed, or given a new password); how many."""
        gone = [token for token, session in self._sessions.items() if session.user == user]
        for token in gone:
            del self._sessions[token]
        return len(gone)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_used >= self._idle or now - session.created >= self._lifetime

    def _expire(self, now: float) -> None:
        """Drop idle sessions from the front (least recently used first); a session
        past its lifetime further back goes when it is next found."""
        while self._sessions:
            session = next(iter(self._sessions.values()))
            if not self._expired(session, now):
                break
            self._sessions.popitem(last=False)
