"""OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's form): logins with an OAuth 2.0 token.

The client's one message carries a login name and a bearer token; the token is
checked by ``auth.bearer.BearerVerifier`` and must name the user the login name
belongs to (as the login grammar reads it: ``alice~phone`` is alice's). A refused
token is answered with the error challenge each mechanism defines (a JSON document
telling the client what scope and issuer to use) and, after the client's dummy
response, ``-ERR [AUTH]``. An issuer that cannot be asked ends the exchange at once
with ``[SYS/TEMP]``: a client should retry later, not throw its token away.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Final, Literal

from popbox.auth.bearer import BearerVerifier, TokenIdentity, TokenRefused
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
    "BEARER_MECHANISMS",
    "MAX_KVPAIRS",
    "BearerMechanism",
    "ClientMessage",
    "bearer_factories",
    "parse_oauthbearer",
    "parse_xoauth2",
]

log = logging.getLogger("popbox.pop3")

BearerKind = Literal["OAUTHBEARER", "XOAUTH2"]
# In the order CAPA lists them: the standard first (curl prefers it too).
BEARER_MECHANISMS: Final[tuple[BearerKind, ...]] = ("OAUTHBEARER", "XOAUTH2")
# RFC 7628 defines three keys (auth, host, port); a client sending more than this
# is not one we know. The message itself is bounded by the SASL line limit.
MAX_KVPAIRS: Final = 16

_KVSEP: Final = "\x01"
# RFC 7628 section 3.1: key = 1*(ALPHA); value = *(VCHAR / SP / HTAB / CR / LF), with
# UTF-8 beyond VCHAR for XOAUTH2's user= (RFC 6856 user names); no other controls.
_KVPAIR: Final = re.compile(r"([A-Za-z]+)=([^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*)")
# RFC 6750 section 2.1 (the scheme is case-insensitive, RFC 7235 section 2.1).
_AUTH_VALUE: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
# RFC 5801 section 4: in a saslname, "," is =2C and "=" is =3D; no other "=".
_SASLNAME: Final = re.compile(r"(?:[^=,]|=2C|=3D)+")


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """What a client's initial message says: the login name ("" when an OAUTHBEARER
    client names none and leaves it to the token) and the bearer token."""

    login: str
    token: str

    def __post_init__(self) -> None:
        # User names are compared in Unicode NFC (RFC 6856 section 2), as for USER.
        object.__setattr__(self, "login", unicodedata.normalize("NFC", self.login))


def _kvpairs(text: str) -> dict[str, str] | None:
    """``key=value^A`` ... ``^A``: the pairs, or None if malformed or repeated."""
    if not text.endswith(_KVSEP):
        return None
    items = text[:-1].split(_KVSEP)
    if items == [""]:
        return {}
    if items[-1] != "" or len(items) - 1 > MAX_KVPAIRS:
        return None
    pairs: dict[str, str] = {}
    for item in items[:-1]:
        match = _KVPAIR.fullmatch(item)
        if match is None or match[1] in pairs:
            return None
        pairs[match[1]] = match[2]
    return pairs


def _token(pairs: dict[str, str]) -> str | None:
    match = _AUTH_VALUE.fullmatch(pairs.get("auth", ""))
    return match[1] if match else None


def parse_oauthbearer(data: bytes) -> ClientMessage | None:
    """RFC 7628 section 3.1's client response; None if malformed or if it asks for
    channel binding (``p=``), which OAUTHBEARER does not define."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    header, sep, rest = text.partition(_KVSEP)
    parts = header.split(",")
    if not sep or len(parts) != 3 or parts[0] not in ("n", "y") or parts[2] != "":
        return None
    login = ""
    if parts[1]:
        name = parts[1].removeprefix("a=")
        if name == parts[1] or not _SASLNAME.fullmatch(name):
            return None
        login = name.replace("=2C", ",").replace("=3D", "=")
    pairs = _kvpairs(rest)
    token = _token(pairs) if pairs is not None else None
    return ClientMessage(login, token) if token is not None else None


def parse_xoauth2(data: bytes) -> ClientMessage | None:
    """Google's XOAUTH2: ``user=NAME^Aauth=Bearer TOKEN^A^A``; None if malformed."""
    try:
        pairs = _kvpairs(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    if pairs is None or set(pairs) != {"user", "auth"} or not pairs["user"]:
        return None
    token = _token(pairs)
    return ClientMessage(pairs["user"], token) if token is not None else None


class BearerMechanism:
    """One OAUTHBEARER or XOAUTH2 exchange (net.sasl's ``ServerMechanism``)."""

    def __init__(self, kind: BearerKind, verifier: BearerVerifier, context: SaslContext) -> None:
        self._kind = kind
        self._verifier = verifier
        self._context = context
        self._asked = False
        # Why the token was refused, once the error challenge is out.
        self._refused: str | None = None

    async def step(self, data: bytes | None) -> SaslReply:
        if self._refused is not None:
            # The client's dummy response to the error challenge (RFC 7628 section
            # 3.2.3: ^A; XOAUTH2: an empty one): whatever it sent, the login failed.
            return Rejected(self._refused)
        if data is None and not self._asked:
            self._asked = True
            return Continue(b"")  # client-first: ask for the initial response
        parse = parse_oauthbearer if self._kind == "OAUTHBEARER" else parse_xoauth2
        message = parse(data or b"")
        if message is None:
            return Rejected(f"malformed {self._kind} message")
        try:
            identity = await self._verifier.verify(message.token)
            if isinstance(identity, TokenRefused):
                return self._error_challenge(identity.reason)
            return await self._match(message.login or identity.username, identity)
        except AuthError as exc:
            return unavailable(f"cannot check the token: {exc}")

    async def _match(self, login: str, identity: TokenIdentity) -> SaslReply:
        owner = await self._context.login_owner(login, "")
        if owner is None:
            return self._error_challenge(f"{login!r} is no login")
        if owner != identity.username:
            return self._error_challenge(f"a token of {identity.username!r} for {owner!r}")
        log.info(
            "session=%s %s token of %s from %s accepted for %s",
            self._context.session_id, self._kind, identity.username, identity.issuer, login,
        )
        return Verified(login, "", f"token:{identity.issuer}")

    def _error_challenge(self, reason: str) -> Continue:
        """RFC 7628 section 3.2.2's error (Google's form for XOAUTH2), then wait for
        the client's dummy response."""
        self._refused = f"token refused: {reason}"
        oauthbearer = self._kind == "OAUTHBEARER"
        document = (
            {"status": "invalid_token"} if oauthbearer else {"status": "401", "schemes": "bearer"}
        )
        if self._verifier.settings.scope:
            document["scope"] = self._verifier.settings.scope
        discovery = self._verifier.openid_configuration
        if oauthbearer and discovery:
            document["openid-configuration"] = discovery
        return Continue(json.dumps(document, separators=(",", ":")).encode(), failed=True)


def bearer_factories(verifier: BearerVerifier) -> dict[str, MechanismFactory]:
    """OAUTHBEARER and XOAUTH2 over one verifier, for ``Pop3Service(mechanisms=...)``."""

    def factory(kind: BearerKind) -> MechanismFactory:
        return lambda context: BearerMechanism(kind, verifier, context)

    return {kind: factory(kind) for kind in BEARER_MECHANISMS}
