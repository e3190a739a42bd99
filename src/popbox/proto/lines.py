"""CRLF line framing for both sides' input, with line-length limits.

A line ends at LF; a CR before it is dropped (RFC 1939 wants CRLF, but bare-LF peers
exist and accepting them costs nothing). On the server a line longer than its limit is
reported once as ``LINE_TOO_LONG`` and the rest of it is dropped as it arrives, so a
hostile client sending a 1 MiB line never makes us hold more than the limit plus one
received chunk. The client shares its buffer with the body decoder (see ``LineReader``).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "LINE_TOO_LONG",
    "MAX_COMMAND_LINE",
    "MAX_SASL_LINE",
    "LineReader",
    "LineTooLongMarker",
]

# RFC 2449 section 4 raises the command line limit to 255 octets; like Dovecot we take
# longer lines so that long passwords work, and stop well before memory matters.
MAX_COMMAND_LINE: Final = 2048
# SASL responses carry OAuth2 bearer tokens (RFC 7628) that run to several KiB.
MAX_SASL_LINE: Final = 16384


class LineTooLongMarker(enum.Enum):
    """The type of ``LINE_TOO_LONG`` (an enum so that mypy can narrow on it)."""

    LINE_TOO_LONG = "line too long"


LINE_TOO_LONG: Final = LineTooLongMarker.LINE_TOO_LONG


class LineReader:
    """Bytes in, lines out, with a per-read limit.

    ``hard_limit`` must be at least every ``limit`` later passed to ``read_line``: it
    bounds what ``feed`` keeps of a partial line before anyone has asked for it.

    With a ``shared`` buffer the lines may be followed by bytes that are not lines and
    that another reader takes from the front of the same buffer (the client: a RETR
    body after its status line, for a ``WireDecoder``). Then ``feed`` keeps every byte,
    ``read_line`` takes one line at a time and leaves what follows it as received, and
    a LINE_TOO_LONG is left where it is: the caller ends the session over it.
    """

    def __init__(self, hard_limit: int, *, shared: bytearray | None = None) -> None:
        if hard_limit < 2:
            raise ValueError("a line limit must leave room for CRLF")
        self._hard_limit = hard_limit
        self._shared = shared is not None
        self._buffer = bytearray() if shared is None else shared
        # True while the bytes arriving belong to a line already known to be too long;
        # they are dropped up to and including its LF.
        self._discarding = False
        # Complete lines not read yet, last first; split from the buffer in one go.
        self._ready: list[bytes] = []
        # 1 when the lines in _ready had CRLF ends (the CR is already dropped), else 0.
        self._crlf = 0

    @property
    def buffered(self) -> int:
        """Octets received and not read yet (the bound tests check it; the client must
        hold none when TLS starts)."""
        return len(self._buffer) + sum(len(line) + 1 + self._crlf for line in self._ready)

    def feed(self, data: bytes) -> None:
        """Append received bytes, dropping what belongs to an over-long line."""
        if self._shared:
            self._buffer += data
            return
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1 :]
            if self._buffer and not self._buffer.endswith(b"\n"):
                # The buffer ends in the kept head of the over-long line: close it so
                # that it is not glued to the next line. The head is longer than any
                # limit, so read_line still reports it as too long.
                self._buffer += b"\n"
        self._buffer += data
        last_lf = self._buffer.rfind(b"\n")
        tail_start = last_lf + 1
        if len(self._buffer) - tail_start > self._hard_limit:
            # Keep just enough of the partial line for read_line to see it is too long.
            del self._buffer[tail_start + self._hard_limit :]
            self._discarding = True

    def read_line(self, limit: int) -> bytes | LineTooLongMarker | None:
        """The next line without its line ending, LINE_TOO_LONG, or None (need data).

        ``limit`` counts the line's octets including its CRLF.
        """
        if limit > self._hard_limit:
            raise ValueError(f"limit {limit} exceeds the reader's hard limit")
        if self._shared:
            return self._take_line(limit)
        ready = self._ready
        if not ready and not self._split():
            buffer = self._buffer
            if len(buffer) < limit:
                return None
            # No line end at all, and already at the limit: drop it as it arrives.
            buffer.clear()
            self._discarding = True
            return LINE_TOO_LONG
        line = self._ready.pop()
        crlf = self._crlf
        if len(line) + crlf >= limit:
            return LINE_TOO_LONG
        if not crlf and line.endswith(b"\r"):
            return line[:-1]
        return line

    def _take_line(self, limit: int) -> bytes | LineTooLongMarker | None:
        """``read_line`` for a shared buffer: only the next line leaves it.

        The same rule as the split below: a line and its ending fit in ``limit``.
        """
        buffer = self._buffer
        end = buffer.find(b"\n", 0, limit)
        if end < 0:
            return LINE_TOO_LONG if len(buffer) >= limit else None
        line = bytes(buffer[:end])
        # CPython drops the head of a bytearray by moving its start, not the rest.
        del buffer[: end + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _split(self) -> bool:
        """Move every complete line out of the buffer; False if there is none.

        A pipelined burst is split with one C-level ``split`` rather than a find and a
        memmove per line. When every line ends in CRLF (the usual case) the CRs go in
        the same split and ``_crlf`` says one octet was dropped from each line.
        """
        buffer = self._buffer
        last = buffer.rfind(b"\n")
        if last < 0:
            return False
        text = bytes(buffer[: last + 1])
        del buffer[: last + 1]
        if text.count(b"\n") == text.count(b"\r\n"):
            lines = text.split(b"\r\n")
            self._crlf = 1
        else:
            lines = text.split(b"\n")
            self._crlf = 0
        lines.pop()  # the empty piece after the last line end
        lines.reverse()  # pop() from the end is O(1)
        self._ready = lines
        return True

    def clear(self) -> None:
        """Forget everything received so far (after STLS: CVE-2011-0411)."""
        self._buffer.clear()
        self._ready = []
        self._discarding = False
