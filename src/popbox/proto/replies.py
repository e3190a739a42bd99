"""POP3 reply serialisation: +OK / -ERR [RESP-CODE] text / multi-line with dot-stuffing.

Status lines (RFC 1939 section 3) and response codes (RFC 2449 section 8, RFC 3206).
Every piece of text that reaches the wire passes through ``_clean`` so that nothing a
caller hands in (a store's error text, a username) can end a line early and forge a
reply.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Final

__all__ = [
    "CODE_AUTH",
    "CODE_IN_USE",
    "CODE_LOGIN_DELAY",
    "CODE_SYS_PERM",
    "CODE_SYS_TEMP",
    "CRLF",
    "RESPONSE_CODES",
    "TERMINATOR",
    "err",
    "multiline",
    "ok",
    "sasl_challenge",
]

CRLF: Final = b"\r\n"
TERMINATOR: Final = b".\r\n"

# RFC 2449 section 8.1.1 and 8.1.2.
CODE_IN_USE: Final = "IN-USE"
CODE_LOGIN_DELAY: Final = "LOGIN-DELAY"
# RFC 3206.
CODE_SYS_TEMP: Final = "SYS/TEMP"
CODE_SYS_PERM: Final = "SYS/PERM"
CODE_AUTH: Final = "AUTH"
RESPONSE_CODES: Final = frozenset(
    {CODE_IN_USE, CODE_LOGIN_DELAY, CODE_SYS_TEMP, CODE_SYS_PERM, CODE_AUTH}
)

# RFC 2449 section 4: a response line is at most 512 octets including CRLF. Text we
# did not write ourselves (store errors, names) is cut to fit.
_MAX_TEXT: Final = 400


def _clean(text: str) -> bytes:
    """Text as one safe line: no CR, LF or other controls, bounded length."""
    if text.isascii() and text.isprintable():
        # The usual case, checked in C: printable ASCII is 0x20-0x7E, nothing to drop.
        return text.encode("ascii")[:_MAX_TEXT]
    cleaned = "".join(" " if ord(char) < 0x20 or ord(char) == 0x7F else char for char in text)
    return cleaned.encode("utf-8", "replace")[:_MAX_TEXT]


def ok(text: str = "") -> bytes:
    """``+OK text``."""
    return b"+OK " + _clean(text) + CRLF if text else b"+OK" + CRLF


def err(text: str, code: str | None = None) -> bytes:
    """``-ERR [CODE] text``; the code must be one of RFC 2449/3206's."""
    if code is not None:
        if code not in RESPONSE_CODES:
            raise ValueError(f"unknown response code {code!r}")
        return b"-ERR [" + code.encode("ascii") + b"] " + _clean(text) + CRLF
    return b"-ERR " + _clean(text) + CRLF


def multiline(first: str, lines: Iterable[str]) -> bytes:
    """``+OK first``, the lines dot-stuffed, then the terminating ``.``."""
    parts = [ok(first)]
    for line in lines:
        data = _clean(line)
        parts.append(b"." + data + CRLF if data.startswith(b".") else data + CRLF)
    parts.append(TERMINATOR)
    return b"".join(parts)


def sasl_challenge(challenge: bytes) -> bytes:
    """``+ base64`` continuation (RFC 5034 section 4); an empty challenge is ``+ ``."""
    return b"+ " + base64.b64encode(challenge) + CRLF
