"""SCRAM on the POP3 server: SCRAM-SHA-256 and SCRAM-SHA-1, with and without -PLUS.

Each AUTH runs one ``ScramServerMechanism`` (a net.sasl ``ServerMechanism``) over
popbox.auth.scram's exchange, in four steps:

1. AUTH without an initial response gets an empty challenge (``+ ``);
2. the client-first message names the login: the login grammar reads it
   (``alice~phone``, ``support*bob``, or the GS2 authzid naming a shared mailbox, as
   PLAIN's authzid does), the user database gives the credentials of the user whose
   password must be proven, and the server-first message goes out;
3. the client-final message carries the proof; the server-final message (``v=``) goes
   out as a challenge, because POP3 has no room for data with ``+OK`` (RFC 5034
   section 4; Dovecot's pop3-login does the same);
4. the client's empty response ends it: the broker opens the mailbox.

Every failure is ``-ERR [AUTH]`` with the text of a wrong password, after the failure
delay; the log says why (the RFC 5802 server-error and the cause). POP3 has no room
for data with ``-ERR`` either, and sending ``e=`` as a challenge would let a client
answer ``*`` and dodge the failure count, so ``e=`` goes to the log only. A user
database that cannot be asked is ``-ERR [SYS/TEMP]``.

-PLUS binds the login to the TLS connection (RFC 5802 section 6): the client proves
it sees the same certificate (``tls-server-end-point``, RFC 5929 section 4, which
works on TLS 1.3) or the same handshake (``tls-unique``, TLS 1.2 and older only:
RFC 9266 section 3 retires it for TLS 1.3). ``tls-exporter`` (RFC 9266) needs the
TLS keying-material exporter, which Python's ssl module does not offer, so it is
refused as an unknown binding type.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Iterable
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from popbox.auth.base import PassDB
from popbox.auth.scram import ClientFirst, ScramFailure, ScramServerExchange
from popbox.errors import AuthError
from popbox.net.sasl import (
    Continue,
    MechanismFactory,
    Rejected,
    SaslContext,
    SaslReply,
    Verified,
    unavailable,
)

__all__ = [
    "SCRAM_MECHANISMS",
    "ScramServerMechanism",
    "channel_bindings",
    "scram_mechanisms",
    "tls_server_end_point",
]

log = logging.getLogger("popbox.pop3")

SCRAM_MECHANISMS: Final = (
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-1",
)

# RFC 9266 section 3: tls-unique is not defined for TLS 1.3.
_TLS_UNIQUE_VERSIONS: Final = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2"})
# RFC 5929 section 4.1: certificates signed with MD5 or SHA-1 are hashed with SHA-256.
_WEAK_SIGNATURE_HASHES: Final = frozenset({"md5", "sha1"})


def scram_mechanisms(names: Iterable[str], passdb: PassDB) -> dict[str, MechanismFactory]:
    """The factories of the SCRAM mechanisms among ``names`` (auth.mechanisms)."""
    wanted = [name for name in names if name in SCRAM_MECHANISMS]
    return {
        name: functools.partial(
            ScramServerMechanism,
            name,
            passdb,
            plus_enabled=name.removesuffix("-PLUS") + "-PLUS" in wanted,
        )
        for name in wanted
    }


@functools.lru_cache(maxsize=8)
def tls_server_end_point(certificate: bytes) -> bytes | None:
    """RFC 5929 section 4.1: the hash of the server's certificate (DER), with the hash
    of its signature, SHA-256 for MD5 and SHA-1. None for a certificate whose
    signature has no single hash (Ed25519, Ed448), for which no binding is defined."""
    try:
        algorithm = x509.load_der_x509_certificate(certificate).signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return None
    if algorithm is None:
        return None
    name = "sha256" if algorithm.name in _WEAK_SIGNATURE_HASHES else algorithm.name
    try:
        return hashlib.new(name, certificate).digest()
    except ValueError:
        return None


def channel_bindings(context: SaslContext) -> dict[str, bytes]:
    """The channel-binding data the session's TLS has, by RFC 5056 name."""
    bindings: dict[str, bytes] = {}
    if context.server_certificate is not None:
        end_point = tls_server_end_point(context.server_certificate)
        if end_point is not None:
            bindings["tls-server-end-point"] = end_point
    tls = context.ssl_object
    if tls is not None and tls.version() in _TLS_UNIQUE_VERSIONS:
        unique = tls.get_channel_binding("tls-unique")
        if unique:
            bindings["tls-unique"] = unique
    return bindings


class ScramServerMechanism:
    """One SCRAM exchange of one AUTH command (net.sasl's ServerMechanism).

    ``plus_enabled``: the server offers this hash's -PLUS variant, so on a TLS
    connection a client that would bind but saw no -PLUS (``y``) is refused.
    """

    def __init__(
        self, name: str, passdb: PassDB, context: SaslContext, *, plus_enabled: bool
    ) -> None:
        self._name = name
        self._passdb = passdb
        self._context = context
        bindings = channel_bindings(context)
        self._exchange = ScramServerExchange(
            name, bindings, plus_offered=plus_enabled and bool(bindings)
        )
        self._first: ClientFirst | None = None
        self._signed = False
        self._steps = 0

    async def step(self, data: bytes | None) -> SaslReply:
        self._steps += 1
        if data is None and self._steps == 1:
            return Continue(b"")  # RFC 5034 section 4: the client goes first
        if data is None:
            return Rejected("no response")
        if self._signed:
            # RFC 5034 section 4: the response to the server-final challenge is empty.
            first = self._first
            if data or first is None:
                return Rejected("a response after the server-final message was not empty")
            return Verified(first.username, first.authzid)
        if self._first is None:
            return await self._client_first(data)
        reply = self._exchange.receive_final(data)
        if isinstance(reply, ScramFailure):
            return _rejected(reply)
        self._signed = True
        return Continue(reply)

    async def _client_first(self, data: bytes) -> SaslReply:
        first = self._exchange.receive_first(data)
        if isinstance(first, ScramFailure):
            return _rejected(first)
        try:
            owner = await self._context.login_owner(first.username, first.authzid)
            # A name that can be no login gets fakes for itself: the exchange goes on
            # as for an unknown user and fails at the end.
            credentials = await self._passdb.scram_credentials(
                owner if owner is not None else first.username, self._exchange.hash_name
            )
        except AuthError as exc:
            log.warning(
                "session=%s user database unavailable: %s",
                self._context.session_id, exc, exc_info=exc,
            )  # fmt: skip
            return unavailable(f"user database unavailable: {exc}")
        if owner is None and not credentials.problem:
            credentials = dataclasses.replace(credentials, problem="not a login name")
        reply = self._exchange.server_first(credentials)
        if isinstance(reply, ScramFailure):
            return _rejected(reply)
        self._first = first
        return Continue(reply)


def _rejected(failure: ScramFailure) -> Rejected:
    return Rejected(f"{failure.reason} (e={failure.server_error})")
