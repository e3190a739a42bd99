"""SASL mechanisms the glue runs: the ones that need the user database or a token
verifier in the middle of the exchange (SCRAM's stored keys, a bearer token's issuer).

The sans-I/O core runs PLAIN and LOGIN itself and hands every other offered mechanism
to the session step by step (``proto.events.SaslExchange``). The session makes one
``ServerMechanism`` per exchange from the hub's factory for that name and feeds it
the client's responses; each step answers ``Continue`` (send a challenge),
``Verified`` (the exchange proved who the client is: the broker opens the mailbox,
as after a checked password) or ``Rejected``. A mechanism never opens mail and never
sees the store: like the rest of the login stage it sees only what ``SaslContext``
gives it.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from popbox.net.login import TEXT_AUTH_FAILED, TEXT_AUTH_UNAVAILABLE
from popbox.proto.replies import CODE_AUTH, CODE_SYS_TEMP

__all__ = [
    "Continue",
    "MechanismFactory",
    "Mechanisms",
    "Rejected",
    "SaslContext",
    "SaslReply",
    "ServerMechanism",
    "Verified",
    "unavailable",
]


@dataclass(frozen=True, slots=True)
class Continue:
    """Send ``+ base64(challenge)`` and wait for the client's next response.

    ``failed`` marks a challenge that already tells the client it failed (RFC 7628's
    error challenge): the failure delay and the address's penalty are served before
    it goes out, so a client that cancels with ``*`` instead of answering is counted
    like one that answers, and the ``Rejected`` that ends the exchange waits no more.
    """

    challenge: bytes
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Verified:
    """The exchange proved the client holds ``username``'s credentials.

    ``username`` is the login name as the client gave it (it may carry a folder, a
    device or a shared mailbox, read by the login grammar as for USER/PASS);
    ``authzid`` a SASL authorization identity naming a shared mailbox ("" for none);
    ``credential`` what was used, for the log ("" for the password itself, else e.g.
    the app password's label or the token's issuer).
    """

    username: str
    authzid: str = ""
    credential: str = ""


@dataclass(frozen=True, slots=True)
class Rejected:
    """The exchange failed: ``-ERR [code] text``, after the failure delay when
    ``code`` is AUTH (a wrong guess); ``reason`` goes to the log only."""

    reason: str
    code: str = CODE_AUTH
    text: str = TEXT_AUTH_FAILED


def unavailable(reason: str) -> Rejected:
    """The user database or a token issuer cannot be asked: ``-ERR [SYS/TEMP]`` at
    once (not a wrong guess), so the client keeps its credentials and retries."""
    return Rejected(reason, CODE_SYS_TEMP, TEXT_AUTH_UNAVAILABLE)


SaslReply: TypeAlias = Continue | Verified | Rejected


class ServerMechanism(Protocol):
    """One exchange of one mechanism, made fresh for each AUTH command."""

    async def step(self, data: bytes | None) -> SaslReply:
        """The client's decoded response (None: AUTH came without an initial
        response). Raises only for bugs: a database or verifier that cannot be asked
        is ``Rejected`` with ``[SYS/TEMP]``."""
        ...


@dataclass(frozen=True, slots=True)
class SaslContext:
    """What a mechanism may know of its session.

    ``login_owner`` reads a login name as the broker will (grammar, shared mailboxes)
    and returns the user whose credentials must be checked, or None when the name can
    be no login; it may ask the user database (AuthError when it cannot).
    ``ssl_object`` is the session's TLS, for channel binding (None on plain
    connections); ``server_certificate`` the DER of the certificate the server
    presents (RFC 5929 tls-server-end-point), None without TLS.
    """

    session_id: str
    ip: str
    login_owner: Callable[[str, str], Awaitable[str | None]] = field(repr=False)
    ssl_object: ssl.SSLObject | None = field(default=None, repr=False)
    server_certificate: bytes | None = field(default=None, repr=False)


MechanismFactory: TypeAlias = Callable[[SaslContext], ServerMechanism]
"""Makes the exchange of one mechanism for one AUTH command."""

Mechanisms: TypeAlias = Mapping[str, MechanismFactory]
"""The glue-run mechanisms a server offers, by upper-case name."""
