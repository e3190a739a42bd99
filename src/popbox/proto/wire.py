"""RETR and TOP on top of popbox.wireform: stored bytes to wire bytes, and back.

``WireEncoder`` turns a stored message into what RETR and TOP send, chunk by chunk: the
wire form itself (CRLF, dot-stuffing, the ending) is popbox.wireform's; what is
protocol here is TOP's cut, the headers and n body lines. ``WireDecoder`` undoes the
wire form on the client side. Both carry their state across chunk boundaries.
"""

from __future__ import annotations

from typing import Final

from popbox.wireform import DotStuffer, to_crlf, to_wire

__all__ = ["WireDecoder", "WireEncoder"]

# An empty line in the CRLF-normalised stream, preceded by the end of the line before
# it: the separator between a message's headers and its body (RFC 5322 section 2.1).
_HEADER_END: Final = b"\n\r\n"
# The octet value of CR, so the hot path compares ints instead of slicing bytes.
_CR: Final = 0x0D


class WireEncoder:
    """Stored bytes -> dot-stuffed wire bytes, for RETR (``body_lines`` None) or TOP.

    For ``TOP n m`` pass ``body_lines=m``: the encoder sends the headers, the blank line
    and m body lines, then sets ``done`` so the caller can stop reading the message. A
    message without a blank line is all headers and is sent whole.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        if body_lines is not None and body_lines < 0:
            raise ValueError("body_lines must not be negative")
        self._body_lines = body_lines
        # Lines still to send after the header separator; None while in the headers.
        self._remaining: int | None = None
        # The last two octets of the normalised stream, to find the header separator
        # across chunks; a virtual LF stands for the start of the message, so that a
        # message opening with an empty line has no headers.
        self._recent = b"\n"
        # The stored stream so far ended in CR: an LF opening the next chunk ends that
        # line as CRLF and is not a bare LF.
        self._after_cr = False
        self._stuffer = DotStuffer()
        self._done = False

    @property
    def done(self) -> bool:
        """TOP has sent all it must; the rest of the message is not needed."""
        return self._done

    def encode(self, chunk: bytes) -> bytes:
        """Wire bytes for the next piece of the stored message (``wireform.to_wire``:
        a piece already in wire form comes back as the same object)."""
        if self._done or not chunk:
            return b""
        after_cr, self._after_cr = self._after_cr, chunk[-1] == _CR
        if self._body_lines is None:
            return to_wire(chunk, after_cr, self._stuffer)
        return self._stuffer.stuff(self._cut_top(to_crlf(chunk, after_cr)))

    def _cut_top(self, normal: bytes) -> bytes:
        """The part of ``normal`` that TOP sends; sets ``done`` at the line limit."""
        assert self._body_lines is not None
        start = 0
        if self._remaining is None:
            joined = self._recent + normal
            found = joined.find(_HEADER_END)
            if found < 0:
                self._recent = joined[-2:]
                return normal
            start = found + len(_HEADER_END) - len(self._recent)
            self._remaining = self._body_lines
        remaining = self._remaining
        if remaining == 0:
            self._done = True
            return normal[:start]
        lines = normal.count(b"\n", start)
        if lines < remaining:
            self._remaining = remaining - lines
            return normal
        # Only the last chunk of a TOP walks line by line, and only up to m lines.
        end = start - 1
        for _ in range(remaining):
            end = normal.find(b"\n", end + 1)
        self._done = True
        return normal[: end + 1]

    def finish(self) -> bytes:
        """A final CRLF if the message lacked one, then the terminating ``.``."""
        return self._stuffer.ending()


class WireDecoder:
    """Wire bytes of a multi-line reply -> its content (client side).

    The content keeps the CRLF line ends of the wire and loses the stuffed dots; the
    terminating ``.`` line is not part of it. Bytes after the terminator are kept in
    ``leftover`` (a pipelining server's next reply).
    """

    def __init__(self) -> None:
        # Starts True: the first line of the body starts right after the status line.
        self._at_line_start = True
        # At most ".\r": the start of a line that may be the terminator.
        self._held = b""
        self._finished = False
        self._leftover = b""

    @property
    def finished(self) -> bool:
        """The terminating ``.`` line has been seen."""
        return self._finished

    @property
    def leftover(self) -> bytes:
        """Bytes received after the terminator."""
        return self._leftover

    def decode(self, data: bytes) -> bytes:
        """Content decoded so far from ``data`` (plus what earlier calls held back)."""
        if self._finished:
            self._leftover += data
            return b""
        # A virtual LF marks that we are at a line start, so that one search for
        # "\n.\r\n" finds the terminator and one replace un-stuffs every line.
        if self._at_line_start:
            stream = b"\n" + self._held + data
            skip = 1
        else:
            stream = data
            skip = 0
        self._held = b""
        end = stream.find(b"\n.\r\n")
        if end >= 0:
            self._finished = True
            self._leftover = stream[end + 4 :]
            body = stream[: end + 1]
        else:
            if stream.endswith(b"\n.\r"):
                cut = len(stream) - 2
            elif stream.endswith(b"\n."):
                cut = len(stream) - 1
            else:
                cut = len(stream)
            self._held = stream[cut:]
            body = stream[:cut]
            self._at_line_start = bool(self._held) or body.endswith(b"\n")
        return body.replace(b"\n.", b"\n")[skip:]
