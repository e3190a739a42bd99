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
    terminating ``.`` line is not part of it. ``decode_from`` works in the receive
    buffer itself: it takes the reply's bytes from the front and leaves what follows
    the terminator (a pipelining server's next replies) where it is, so a read holding
    many messages is not copied again for each of them. ``decode`` does the same for
    pieces handed in one by one and keeps what follows the terminator in ``leftover``.
    """

    __slots__ = ("_at_line_start", "_finished", "_pending")

    # The walk over the dots gives way to the scan once it has met more than one dot
    # in 64 octets (plus this slack): past that, a dot costs more in Python than the
    # scan's C-level search and split cost per octet. The choice is made for each call,
    # not for the whole body: dot-dense headers do not cost an attachment the walk.
    _WALK_SHIFT: Final = 6
    _WALK_SLACK: Final = 8
    # Octets are compared as ints: 0x2E ".", 0x0A LF, 0x0D CR.

    def __init__(self) -> None:
        # Starts True: the first line of the body starts right after the status line.
        self._at_line_start = True
        self._finished = False
        # What ``decode`` was given and has not decoded (after the end: the leftover).
        self._pending = bytearray()

    @property
    def finished(self) -> bool:
        """The terminating ``.`` line has been seen."""
        return self._finished

    @property
    def leftover(self) -> bytes:
        """Bytes ``decode`` received after the terminator."""
        return bytes(self._pending) if self._finished else b""

    def decode(self, data: bytes) -> bytes:
        """Content decoded so far from ``data`` (plus what earlier calls held back)."""
        self._pending += data
        return self.decode_from(self._pending)

    def decode_from(self, received: bytearray) -> bytes:
        """Content from the front of ``received``; the bytes it came from leave it.

        Stops after the terminator (then ``finished``). A ``.`` or ``.\\r`` at a line
        start that may still become the terminator stays in ``received`` for the next
        call. b"" means nothing can be decoded until more bytes arrive.
        """
        if self._finished or not received:
            return b""
        start = 0
        if self._at_line_start and received[0] == 0x2E:
            head = bytes(received[:3])
            if head == b".\r\n":
                del received[:3]
                self._finished = True
                return b""
            if b".\r\n".startswith(head):
                return b""
            start = 1  # the stuffed dot of this line
        return self._walk(received, start)

    def _walk(self, received: bytearray, start: int) -> bytes:
        """Decode with one memchr per ``.``: it finds the stuffed dots and the terminator
        alike. Mail text has few dots and base64 none, and CPython's substring search
        for "\\n.\\r\\n" or "\\n." skips poorly over text, where every line ends in LF."""
        find = received.find
        length = len(received)
        stop = consumed = length
        stuffed: list[int] = []
        visited = 0
        shift, slack = self._WALK_SHIFT, self._WALK_SLACK
        dot = find(b".", 1)  # a dot at 0 is mid-line or was dealt with above
        while dot >= 0:
            visited += 1
            if visited > ((dot - start) >> shift) + slack:
                return self._scan(received, start)
            if received[dot - 1] == 0x0A:
                after = dot + 1
                if after + 1 < length:
                    if received[after] == 0x0D and received[after + 1] == 0x0A:
                        stop, consumed = dot, dot + 3
                        self._finished = True
                        break
                elif after == length or received[after] == 0x0D:
                    stop = consumed = dot  # "." or ".\r" last: may be the terminator
                    break
                stuffed.append(dot)
            dot = find(b".", dot + 1)
        with memoryview(received) as view:
            if stuffed:
                # The pieces between the stuffed dots, joined without them.
                begins = [start, *(position + 1 for position in stuffed)]
                ends = [*stuffed, stop]
                pieces = zip(begins, ends, strict=True)
                content = b"".join([view[begin:end] for begin, end in pieces])
            else:
                content = bytes(view[start:stop])
        self._at_line_start = received[consumed - 1] == 0x0A
        del received[:consumed]
        return content

    def _scan(self, received: bytearray, start: int) -> bytes:
        """Decode with a C-level search for the terminator and a split at each stuffed
        dot: the cost per octet does not grow with the dots (a body of dot-dense text)."""
        end = received.find(b"\n.\r\n", start)
        if end >= 0:
            stop, consumed = end + 1, end + 4
            self._finished = True
        else:
            stop = len(received)
            if received.endswith(b"\n.\r"):
                stop -= 2
            elif received.endswith(b"\n."):
                stop -= 1
            consumed = stop
        with memoryview(received) as view:
            content = bytes(view[start:stop])
        if b"\n." in content:
            # split/join, not replace: CPython's replace of a two-octet pattern is slower.
            content = b"\n".join(content.split(b"\n."))
        self._at_line_start = received[consumed - 1] == 0x0A
        del received[:consumed]
        return content
