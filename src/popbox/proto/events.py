"""The events a ``ServerConnection`` hands to the glue (docs/dev/server-api.md).

Each event is something the sans-I/O core cannot do itself: read more bytes, check a
password, start TLS, stream a message, commit deletions, or close. Everything else the
core answers on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NewType, TypeAlias

__all__ = [
    "FLUSH",
    "NEED_DATA",
    "ApopRequest",
    "CloseConnection",
    "ConnectionClosed",
    "Event",
    "Flush",
    "LoginRequest",
    "NeedData",
    "Quit",
    "Retrieve",
    "SaslExchange",
    "SnapshotIndex",
    "StartTls",
]

SnapshotIndex = NewType("SnapshotIndex", int)
"""The 0-based position of a message in the maildrop snapshot taken at login."""


@dataclass(frozen=True, slots=True)
class NeedData:
    """Read more bytes (with the state's idle timeout) and call ``receive_data``."""


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Flush:
    """Queued replies passed the high-water mark: write ``data_to_send()``, await the
    transport's drain, then call ``next_event()`` again. Nothing else to do.

    It keeps a client that pipelines thousands of cheap commands from making the core
    queue an unbounded amount of output in one ``next_event()`` call.
    """


FLUSH: Final = Flush()


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """USER/PASS or SASL: verify, open the maildrop, then ``login_succeeded`` or
    ``login_failed``."""

    username: str
    # Kept out of repr so that logging an event never logs a password.
    password: str = field(repr=False)
    mechanism: str = "USER"
    """"USER" for USER/PASS, else the SASL mechanism ("PLAIN", "LOGIN")."""
    authzid: str = ""
    """SASL PLAIN's authorization identity when it is not ``username`` (RFC 4616):
    open that mailbox as the member ``username``; "" for the user's own login."""


@dataclass(frozen=True, slots=True)
class ApopRequest:
    """APOP: compare ``digest`` with ``apop_digest(timestamp, secret)``, then as above."""

    username: str
    digest: str
    timestamp: str


@dataclass(frozen=True, slots=True)
class SaslExchange:
    """One step of a SASL mechanism the glue runs, because it needs the user database
    or a token verifier (SCRAM, OAUTHBEARER, XOAUTH2): ``data`` is the client's
    decoded response, None when AUTH came without an initial response; ``first`` is
    True for the step that starts an exchange.

    The glue answers ``sasl_challenge(data)`` to send ``+ base64`` and wait for the
    client's next response (another SaslExchange), or ends the exchange as a login
    ends: ``login_succeeded`` or ``login_failed``. A client that cancels (``*``) ends
    it without an event: the next ``first`` step starts afresh.
    """

    mechanism: str
    data: bytes | None
    first: bool


@dataclass(frozen=True, slots=True)
class StartTls:
    """STLS: write the queued ``+OK``, upgrade, then ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class Retrieve:
    """RETR (``body_lines`` None) or TOP n m (``body_lines`` m): stream one message."""

    index: SnapshotIndex
    number: int
    size: int
    body_lines: int | None


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT in TRANSACTION: commit these snapshot indexes, then ``quit_result``."""

    deletions: frozenset[int]


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """The core ended the session; its last reply is queued. Write it and close."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer went away."""


Event: TypeAlias = (
    NeedData
    | Flush
    | LoginRequest
    | ApopRequest
    | SaslExchange
    | StartTls
    | Retrieve
    | Quit
    | CloseConnection
    | ConnectionClosed
)
