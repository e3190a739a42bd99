"""SASL for both sides (RFC 4616 PLAIN, the LOGIN draft, OAuth2 bearers) and APOP.

Server side: each mechanism is a small pure state machine: it is started with the
client's initial response (or None), answers each client response with the next step,
and ends in ``Credentials`` or ``SaslFailure``. Base64 framing (RFC 5034 section 4) is
decoded here too, strictly: anything that is not canonical base64 is a failure, never an
exception. Client side: the collector's responses (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER)
and the decoding of the server's challenges, pure functions of their inputs. The APOP
digest serves both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import unicodedata
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

__all__ = [
    "CORE_MECHANISMS",
    "MECHANISMS",
    "PLAINTEXT_MECHANISMS",
    "Challenge",
    "Credentials",
    "LoginMechanism",
    "Mechanism",
    "PlainMechanism",
    "SaslFailure",
    "SaslStep",
    "apop_digest",
    "decode_challenge",
    "decode_response",
    "is_mechanism_name",
    "login_responses",
    "needs_channel_binding",
    "new_mechanism",
    "oauthbearer_response",
    "plain_response",
    "xoauth2_response",
]

# The LOGIN draft (draft-murchison-sasl-login) prompts, as every client expects them:
# base64 "VXNlcm5hbWU6" and "UGFzc3dvcmQ6".
LOGIN_USERNAME_PROMPT: Final = b"Username:"
LOGIN_PASSWORD_PROMPT: Final = b"Password:"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``+ base64(data)`` and wait for the client's next response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """The exchange is complete: verify these."""

    username: str
    password: str = field(repr=False)
    authzid: str = ""
    """PLAIN's authorization identity when it names someone else (RFC 4616): the
    mailbox ``username`` asks to open with their own password; "" for their own."""


@dataclass(frozen=True, slots=True)
class SaslFailure:
    """The exchange failed (malformed response); counts as an authentication failure."""

    reason: str


SaslStep: TypeAlias = Challenge | Credentials | SaslFailure


def decode_response(line: bytes) -> bytes | None:
    """Strict base64 (RFC 5034 section 4), or None when the line is not base64."""
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _nfc(name: str) -> str:
    """User names are compared in Unicode NFC (RFC 6856 section 2, RFC 5198)."""
    return name if name.isascii() else unicodedata.normalize("NFC", name)


def _is_name(text: str) -> bool:
    """A user name may not carry control characters (they would reach logs and lookups)."""
    return bool(text) and not any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)


class Mechanism(Protocol):
    """One exchange of one SASL mechanism."""

    name: str

    def start(self, initial: bytes | None) -> SaslStep:
        """Begin, with the decoded initial response or None if the client sent none."""
        ...

    def respond(self, data: bytes) -> SaslStep:
        """The client's decoded response to the last challenge."""
        ...


class PlainMechanism:
    """RFC 4616: one message ``authzid NUL authcid NUL passwd``.

    An authzid other than the authcid asks to act as that identity: for popbox, to
    open that (shared) mailbox as a member, which the glue allows or refuses.
    """

    name = "PLAIN"

    def start(self, initial: bytes | None) -> SaslStep:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> SaslStep:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return SaslFailure("Invalid PLAIN message")
        authzid, authcid, passwd = (_utf8(part) for part in parts)
        if authzid is None or authcid is None or passwd is None:
            return SaslFailure("Invalid UTF-8 in PLAIN message")
        if not _is_name(authcid) or not passwd:
            return SaslFailure("Invalid user name or empty password")
        if authzid and not _is_name(authzid):
            return SaslFailure("Invalid authorization identity")
        authcid, authzid = _nfc(authcid), _nfc(authzid)
        return Credentials(authcid, passwd, "" if authzid == authcid else authzid)


class LoginMechanism:
    """The LOGIN mechanism: a username prompt, then a password prompt.

    An initial response, if any, is the username (as clients that send one expect).
    """

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> SaslStep:
        if initial is None:
            return Challenge(LOGIN_USERNAME_PROMPT)
        return self.respond(initial)

    def respond(self, data: bytes) -> SaslStep:
        text = _utf8(data)
        if text is None:
            return SaslFailure("Invalid UTF-8 in LOGIN response")
        if self._username is None:
            if not _is_name(text):
                return SaslFailure("Invalid user name")
            self._username = _nfc(text)
            return Challenge(LOGIN_PASSWORD_PROMPT)
        if not text:
            return SaslFailure("Empty password")
        return Credentials(self._username, text)


# What a server offers unless told otherwise: the two the core runs itself.
MECHANISMS: Final = ("PLAIN", "LOGIN")
# The mechanisms the core runs itself (pure, no lookup). Any other offered mechanism
# is run by the glue, step by step (events.SaslExchange).
CORE_MECHANISMS: Final = frozenset(MECHANISMS)
# Mechanisms whose messages carry a password or a bearer token as it is (inside
# base64): offered only where plaintext logins are allowed, as Dovecot does. SCRAM
# sends neither, so it is offered on plain connections too.
PLAINTEXT_MECHANISMS: Final = frozenset({"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"})
# RFC 4422 section 3.1: a mechanism name is 1 to 20 of A-Z, 0-9, "-" and "_".
_MECHANISM_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_MAX_MECHANISM_NAME: Final = 20


def is_mechanism_name(name: str) -> bool:
    """Whether ``name`` is a SASL mechanism name (RFC 4422 section 3.1, upper case)."""
    return 0 < len(name) <= _MAX_MECHANISM_NAME and set(name) <= _MECHANISM_NAME_CHARS


def needs_channel_binding(name: str) -> bool:
    """A ``-PLUS`` mechanism (RFC 5802 section 4) binds to the TLS channel: offered
    only inside TLS."""
    return name.endswith("-PLUS")


def new_mechanism(name: str) -> Mechanism | None:
    """A fresh exchange for ``name`` (upper case), or None if we do not offer it."""
    if name == "PLAIN":
        return PlainMechanism()
    if name == "LOGIN":
        return LoginMechanism()
    return None


def apop_digest(timestamp: str, secret: str) -> str:
    """RFC 1939 section 7: lower-case hex MD5 of the greeting's timestamp and the secret.

    MD5 is what the RFC prescribes; APOP is off by default because of it.
    """
    data = (timestamp + secret).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# ---------------------------------------------------------------------------- client


def decode_challenge(text: str) -> bytes | None:
    """A server's challenge (the text after ``+``, stripped), or None if not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def plain_response(username: str, password: str, authzid: str = "") -> bytes:
    """RFC 4616: ``authzid NUL authcid NUL passwd``."""
    return b"\0".join(part.encode("utf-8") for part in (authzid, username, password))


def login_responses(username: str, password: str) -> tuple[bytes, bytes]:
    """The LOGIN mechanism's two answers (to "Username:" and "Password:")."""
    return username.encode("utf-8"), password.encode("utf-8")


def xoauth2_response(username: str, token: str) -> bytes:
    """Google/Microsoft XOAUTH2: ``user=U ^A auth=Bearer T ^A ^A``."""
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer_response(
    username: str, token: str, host: str | None = None, port: int | None = None
) -> bytes:
    """RFC 7628 OAUTHBEARER: a GS2 header naming the user, then key=value pairs."""
    # RFC 5801 section 4: "," and "=" in the authzid are escaped as =2C and =3D.
    authzid = username.replace("=", "=3D").replace(",", "=2C")
    parts = [f"n,a={authzid},"]
    if host is not None:
        parts.append(f"host={host}")
    if port is not None:
        parts.append(f"port={port}")
    parts.append(f"auth=Bearer {token}")
    return ("\x01".join(parts) + "\x01\x01").encode()
