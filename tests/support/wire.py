"""What a POP3 client sees of a stored message, computed independently of popbox.

The test suite's reference model of the wire form (RFC 1939 sections 3 and 11),
written to be obviously right rather than fast, and from the RFC rather than from
popbox.wireform or popbox.proto, so that a bug there cannot hide by agreeing with
itself: what every RETR and TOP path is compared with.

A stored message's lines end in LF or CRLF (a bare CR is no line end). On the wire
every line ends in CRLF, a message that lacks a final line end gets one, a line that
starts with ``.`` gets one more, and a ``.`` line ends the reply.
"""

from __future__ import annotations

import re

__all__ = [
    "TERMINATOR",
    "crlf",
    "dotted_after_lf",
    "lf",
    "retr_wire",
    "split_at",
    "stuff",
    "top_content",
    "top_wire",
    "unstuff",
    "wire",
]

TERMINATOR = b".\r\n"


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


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at each of ``cuts`` (taken modulo its length + 1), empty pieces kept."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def stuff(content: bytes) -> bytes:
    """CRLF-normalised content with a ``.`` before every line that starts with one."""
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for line in content.split(b"\r\n")[:-1]
    )


def top_content(data: bytes, body_lines: int) -> bytes:
    """What ``TOP n body_lines`` sends before stuffing: headers, blank line, n lines."""
    lines = wire(data).split(b"\r\n")[:-1]
    if b"" not in lines:
        kept = lines
    else:
        blank = lines.index(b"")
        kept = lines[: blank + 1 + body_lines]
    return b"".join(line + b"\r\n" for line in kept)


def retr_wire(stored: bytes) -> bytes:
    """The body of RETR's reply for ``stored``, terminator included."""
    return stuff(wire(stored)) + TERMINATOR


def top_wire(stored: bytes, body_lines: int) -> bytes:
    """The body of TOP's reply for ``stored``, terminator included."""
    return stuff(top_content(stored, body_lines)) + TERMINATOR


def dotted_after_lf(data: bytes, at_line_start: bool = True) -> bytes:
    """``data`` with a ``.`` added before each ``.`` that follows an LF (or opens it,
    when ``at_line_start``), whatever else the bytes hold: dot-stuffing alone."""
    lines = re.split(b"(?<=\n)", data)
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    if not at_line_start and lines[0].startswith(b"."):
        out[0] = lines[0]
    return b"".join(out)
