"""The POP3 session state machine (RFC 1939 section 3), as one table.

Rules of the table:

1. A key is (state the session is in, command verb); its value is the state the
   session is in once that command has succeeded.
2. A pair that is not in the table is refused with ``-ERR`` and counts as a bad
   command. Handlers never look at the state: the server consults this table once,
   before any handler runs.
3. Commands that need the glue (PASS, APOP, AUTH: a login; QUIT in TRANSACTION: the
   commit) move the session only when the glue reports success; a failure leaves the
   session where it was.
4. UPDATE and CLOSED accept nothing: in UPDATE the glue is committing deletions, and
   CLOSED is the end.
5. CAPA announces STLS, USER and SASL only in states where this table accepts STLS,
   USER and AUTH, so the capability list and the table cannot disagree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from popbox.proto.commands import Verb

__all__ = ["TRANSITIONS", "SessionState", "accepts", "next_state"]


class SessionState(enum.Enum):
    """RFC 1939's states, plus CLOSED for a session that has ended."""

    # Identity hash: see Verb (the table is consulted once per command).
    __hash__ = object.__hash__

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


_A: Final = SessionState.AUTHORIZATION
_T: Final = SessionState.TRANSACTION

TRANSITIONS: Final[Mapping[tuple[SessionState, Verb], SessionState]] = MappingProxyType(
    {
        # Before login: capabilities, TLS, the ways to log in, and leaving.
        (_A, Verb.CAPA): _A,
        (_A, Verb.STLS): _A,
        (_A, Verb.USER): _A,
        (_A, Verb.PASS): _T,
        (_A, Verb.APOP): _T,
        (_A, Verb.AUTH): _T,
        (_A, Verb.QUIT): SessionState.CLOSED,
        # RFC 6856: UTF8 only before login, LANG in both states.
        (_A, Verb.UTF8): _A,
        (_A, Verb.LANG): _A,
        (_T, Verb.LANG): _T,
        # After login: the maildrop commands; QUIT commits (UPDATE) before closing.
        (_T, Verb.CAPA): _T,
        (_T, Verb.STAT): _T,
        (_T, Verb.LIST): _T,
        (_T, Verb.UIDL): _T,
        (_T, Verb.RETR): _T,
        (_T, Verb.TOP): _T,
        (_T, Verb.DELE): _T,
        (_T, Verb.NOOP): _T,
        (_T, Verb.RSET): _T,
        (_T, Verb.QUIT): SessionState.UPDATE,
    }
)


# The same table keyed by state first, for the per-command lookup: no tuple to build.
_BY_STATE: Final[dict[SessionState, dict[Verb, SessionState]]] = {
    state: {verb: after for (before, verb), after in TRANSITIONS.items() if before is state}
    for state in SessionState
}


def next_state(state: SessionState, verb: Verb) -> SessionState | None:
    """The state after ``verb`` succeeds in ``state``, or None if it is not allowed."""
    return _BY_STATE[state].get(verb)


def accepts(state: SessionState, verb: Verb) -> bool:
    """Whether ``verb`` may be used in ``state``."""
    return (state, verb) in TRANSITIONS
