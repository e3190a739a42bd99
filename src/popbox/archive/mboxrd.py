"""The mbox framing, both ways: ``From `` lines, mboxrd quoting, splitting a file.

An mbox is messages one after another, each opened by a ``From `` line (the envelope
sender and a date in asctime form) and closed by an empty line. A body line that
would read as a ``From `` line is quoted with a ``>``; mboxrd quotes every line that
matches ``>*From `` (adding one ``>``) so that reading removes exactly one ``>`` from
every line matching ``>+From `` and gives back the message it was given. mboxo (what
Thunderbird writes) quotes only ``From ``; reading it as mboxrd turns a body line
that was ``>From `` before it was written into ``From `` — the one ambiguity of mboxo,
and the choice every mbox reader makes.

Line ends are the message's own: an LF-only message stays LF-only and a CRLF one CRLF
(the archive keeps what it was given, byte for byte). Only the framing is ours: the
``From `` line and the empty line after each message, written with a bare LF and read
as either. A message whose last line has no line end gets one in an mbox (the format
has no other way to end it); every other message comes back byte-identical.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

__all__ = [
    "HEADER_SCAN",
    "LINE_PIECE",
    "SPOOL_THRESHOLD",
    "MboxMessage",
    "MboxrdQuoter",
    "envelope_sender",
    "from_line",
    "read_mbox",
]

# What is read of one line at once: a line longer than this (base64 without line
# breaks, a hostile file) comes in pieces, so memory stays bounded.
LINE_PIECE: Final = 64 * 1024
# A message up to this size is handed on as bytes; a larger one goes to a temporary
# file (a 25 MB attachment is common, a multi-GB mbox must not sit in memory).
SPOOL_THRESHOLD: Final = 8 * 1024 * 1024
# How much of a message's start is searched for its Return-Path header: headers
# beyond this are not headers a mail client would show either.
HEADER_SCAN: Final = 256 * 1024
# Who a message without a known envelope sender is from, as in sendmail's mboxes.
UNKNOWN_SENDER: Final = "MAILER-DAEMON"

_QUOTED: Final = re.compile(rb">+From ")
_TO_QUOTE: Final = re.compile(rb"(?m)^(?=>*From )")
# What a line's start may be while it could still turn out to be a From line.
_FROM_PREFIX: Final = re.compile(rb"(?:F|Fr|Fro|From)?")
_RETURN_PATH: Final = re.compile(rb"(?im)^Return-Path:[ \t]*<([^<>\r\n]*)>")
_HEADER_END: Final = re.compile(rb"\r?\n\r?\n")
_MOZILLA_STATUS: Final = re.compile(rb"(?i)X-Mozilla-Status:[ \t]*([0-9A-Fa-f]{1,8})")
# Thunderbird's flag for a message deleted but not yet compacted away (nsMsgMessageFlags
# Expunged): the folder still holds it, the user threw it away.
_MOZILLA_EXPUNGED: Final = 0x0008


def from_line(sender: str, when: float) -> bytes:
    """The ``From `` line opening a message: the envelope sender (MAILER-DAEMON when
    unknown or not one word) and ``when`` in asctime form, UTC."""
    if not sender or not sender.isascii() or any(ch.isspace() for ch in sender):
        sender = UNKNOWN_SENDER
    stamp = time.asctime(time.gmtime(max(0.0, when)))
    return f"From {sender} {stamp}\n".encode("ascii")


def envelope_sender(head: bytes) -> str:
    """The Return-Path address in a message's header block (its start), or ""."""
    end = _HEADER_END.search(head)
    match = _RETURN_PATH.search(head, 0, end.start() if end else len(head))
    if match is None:
        return ""
    return match.group(1).decode("ascii", "replace").strip()


class MboxrdQuoter:
    """Adds the mboxrd ``>`` to the lines of a message that arrives in chunks.

    Chunks split lines anywhere, so the start of a line that may still become
    ``From `` (up to four octets) waits for the next chunk. A run of ``>`` may be
    written out before it is known whether ``From `` follows: the one ``>`` that
    quoting adds may as well go just before ``From``.
    """

    __slots__ = ("_at_start", "_held")

    def __init__(self) -> None:
        self._at_start = True
        """The next octet starts a line, or follows only ``>`` since a line start."""
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        self._held = b""
        cut = data.rfind(b"\n") + 1
        tail_in_start = cut > 0 or self._at_start
        tail = data[cut:]
        quotes = len(tail) - len(tail.lstrip(b">"))
        rest = tail[quotes:]
        at_start_after: bool
        if tail_in_start and _FROM_PREFIX.fullmatch(rest):
            self._held = rest
            body = data[: len(data) - len(rest)]
            at_start_after = True
        else:
            body = data
            at_start_after = tail_in_start and not rest
        out = self._quote(body)
        self._at_start = at_start_after
        return out

    def flush(self) -> bytes:
        """What is held at the message's end (a last line such as ``Fro``)."""
        held, self._held = self._held, b""
        self._at_start = True
        return held

    def _quote(self, body: bytes) -> bytes:
        if self._at_start:
            return _TO_QUOTE.sub(b">", body)
        first = body.find(b"\n") + 1
        if first == 0:
            return body
        return body[:first] + _TO_QUOTE.sub(b">", body[first:])


@dataclass(frozen=True, slots=True)
class MboxMessage:
    """One message of an mbox: its octets (``content`` bytes, or a temporary file
    of the caller's ``spool`` directory holding them), its number in the file
    (from 1), and whether Thunderbird marked it deleted."""

    number: int
    content: bytes | Path
    size: int
    expunged: bool


class _Collector:
    """One message's octets as they are read: in memory, then in a file if large."""

    __slots__ = ("_file", "_name", "_parts", "_spool", "head", "size")

    def __init__(self, spool: Path) -> None:
        self._spool = spool
        self._parts: list[bytes] = []
        self._file: BinaryIO | None = None
        self._name = Path()
        self.size = 0
        self.head = b""
        """The message's first octets (up to HEADER_SCAN), for its headers."""

    def add(self, piece: bytes) -> None:
        if len(self.head) < HEADER_SCAN:
            self.head += piece[: HEADER_SCAN - len(self.head)]
        self.size += len(piece)
        if self._file is not None:
            self._file.write(piece)
            return
        self._parts.append(piece)
        if self.size > SPOOL_THRESHOLD:
            fd, name = tempfile.mkstemp(dir=self._spool, suffix=".eml")
            self._name = Path(name)
            self._file = os.fdopen(fd, "wb")
            for part in self._parts:
                self._file.write(part)
            self._parts = []

    def finish(self) -> bytes | Path:
        if self._file is None:
            return b"".join(self._parts)
        self._file.close()
        return self._name

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._name.unlink(missing_ok=True)


def _is_expunged(head: bytes) -> bool:
    end = _HEADER_END.search(head)
    block = head[: end.start()] if end else head
    for match in _MOZILLA_STATUS.finditer(block):
        start = match.start()
        if start == 0 or block[start - 1 : start] == b"\n":
            return bool(int(match.group(1), 16) & _MOZILLA_EXPUNGED)
    return False


def read_mbox(fp: BinaryIO, spool: Path) -> Iterator[MboxMessage]:
    """The messages of an mbox open for reading at its start, one at a time.

    A message starts at a ``From `` line at the file's start or after an empty line
    (so an unquoted ``From `` inside a paragraph, as careless writers leave, stays
    in its message); the empty line before it is framing and is dropped. Lines
    matching ``>+From `` lose one ``>``. A message larger than SPOOL_THRESHOLD comes
    as a file in ``spool``: the caller removes it once it is done with it. ValueError
    if the file does not begin with a ``From `` line (it is no mbox).
    """
    number = 0
    current: _Collector | None = None
    pending_blank = b""
    at_line_start = True
    in_from_line = False
    try:
        for piece in iter(lambda: fp.readline(LINE_PIECE), b""):
            starts_line = at_line_start
            at_line_start = piece.endswith(b"\n")
            if not starts_line:
                if not in_from_line:
                    assert current is not None
                    current.add(piece)
                continue
            in_from_line = False
            if piece.startswith(b"From ") and (current is None or pending_blank):
                if current is not None:
                    yield _finish(number, current)
                number += 1
                current = _Collector(spool)
                pending_blank = b""
                in_from_line = True
                continue
            if current is None:
                raise ValueError("it does not begin with a From line")
            if pending_blank:
                current.add(pending_blank)
                pending_blank = b""
            if at_line_start and piece in (b"\n", b"\r\n"):
                pending_blank = piece
                continue
            if piece[:1] == b">" and _QUOTED.match(piece):
                piece = piece[1:]
            current.add(piece)
        if current is not None:
            yield _finish(number, current)
            current = None
    finally:
        if current is not None:
            current.discard()


def _finish(number: int, current: _Collector) -> MboxMessage:
    expunged = _is_expunged(current.head)
    return MboxMessage(number, current.finish(), current.size, expunged)
