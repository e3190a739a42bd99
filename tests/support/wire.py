"""What a POP3 client sees of a stored message, computed independently of popbox.

These are the test suite's reference for the wire form (RFC 1939 section 3): CRLF
line ends, a final CRLF, and dot-stuffing undone. They are written from the RFC, not
from popbox.wireform or popbox.proto, so a bug there cannot hide by agreeing with
itself.
"""

from __future__ import annotations

__all__ = ["crlf", "lf", "unstuff", "wire"]


def crlf(data: bytes) -> bytes:
    """Every line end as CRLF (a bare LF becomes CRLF; a bare CR stays as it is)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lf(data: bytes) -> bytes:
    """Every CRLF as a bare LF, as a Maildir or mbox stores it."""
    return data.replace(b"\r\n", b"\n")


def wire(message: bytes) -> bytes:
    """What a client un-stuffs from RETR: CRLF line ends and a final CRLF.

    An empty message stays empty: RETR sends nothing but the terminator for it.
    """
    data = crlf(message)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def unstuff(body: bytes) -> bytes:
    """Undo the dot-stuffing of a multi-line body received without its terminator."""
    return (b"\r\n" + body).replace(b"\r\n..", b"\r\n.")[2:]
