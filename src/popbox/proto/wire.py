"""Wire form of a stored message: LF -> CRLF, a final CRLF, dot-stuffing (RFC 1939 s3).

``wire_size`` is the size rule STAT and LIST report. ``WireEncoder`` turns stored bytes
into what RETR and TOP send, chunk by chunk, and ``WireDecoder`` undoes it on the client
side. ``CrlfNormaliser`` is what delivery stores (CRLF line ends, so that stored bytes
are already wire form), and ``dot_stuffing_offsets`` with ``wire_ending`` describe how
to send such bytes without copying them (the server's sendfile path). The encoder and
decoder carry their state across chunk boundaries and work with whole-chunk bytes
operations (replace, find, count), because this is the hot path for 200 MB messages.
Nothing but line endings and leading dots changes: bare CR, NUL, 8-bit bytes and long
lines pass through.
"""

from __future__ import annotations

import mmap
from typing import Final, TypeAlias

__all__ = [
    "CrlfNormaliser",
    "Searchable",
    "WireDecoder",
    "WireEncoder",
    "dot_stuffing_offsets",
    "stuff_wire_ready",
    "wire_ending",
    "wire_size",
]

_TERMINATOR: Final = b".\r\n"
# An empty line in the CRLF-normalised stream, preceded by the end of the line before
# it: the separator between a message's headers and its body (RFC 5322 section 2.1).
_HEADER_END: Final = b"\n\r\n"
# Octet values, so the hot path compares ints instead of slicing one-byte strings.
_LF: Final = 0x0A
_CR: Final = 0x0D
_DOT: Final = 0x2E

def wire_size(data: bytes) -> int:
    """Octets RETR sends for ``data`` before dot-stuffing (what STAT and LIST report).

    Every bare LF becomes CRLF and a message that does not end in a line ending gets
    a final CRLF. An empty message stays empty.
    """
    if not data:
        return 0
    bare_lf = data.count(b"\n") - data.count(b"\r\n")
    size = len(data) + bare_lf
    if not data.endswith(b"\n"):
        size += 2
    return size


# What dot_stuffing_offsets scans: anything with find() and the buffer protocol.
Searchable: TypeAlias = bytes | bytearray | mmap.mmap


def dot_stuffing_offsets(data: Searchable, length: int, at_line_start: bool = True) -> list[int]:
    """Offsets of the lines of ``data[:length]`` that start with ``.``, in order.

    For CRLF-clean bytes (no bare LF) this is the whole of dot-stuffing: the wire form
    is ``data`` with one more ``.`` before each offset, then ``wire_ending``. A message
    scanned in pieces passes ``at_line_start``: whether the piece before ended with LF.
    """
    offsets: list[int] = []
    if length <= 0:
        return offsets
    # One memchr per ".": base64 has none, so most of RETR's bytes cost one memchr in
    # all, and text has a few per line. That beats any search for the two octets "\n."
    # (bytes.find and replace run a general substring search, ~0.85 s/GB on the
    # benchmark's text mail; re ~0.55; this ~0.2).
    find = data.find
    found = find(b".", 0, length)
    if found == 0:
        if at_line_start:
            offsets.append(0)
        found = find(b".", 1, length)
    append = offsets.append
    while found >= 0:
        if data[found - 1] == _LF:
            append(found)
        found = find(b".", found + 1, length)
    return offsets


def wire_ending(length: int, last_octet: int) -> bytes:
    """What follows CRLF-clean stored bytes on the wire: a missing final CRLF, then ``.``.

    ``last_octet`` is the stored bytes' last octet (ignored when ``length`` is 0), the
    same rule as ``WireEncoder.finish``.
    """
    if length == 0 or last_octet == _LF:
        return _TERMINATOR
    return b"\r\n" + _TERMINATOR


def stuff_wire_ready(chunk: bytes, at_line_start: bool) -> bytes:
    """Dot-stuff the next piece of CRLF-clean stored bytes (the encoder's stuffing too).

    ``at_line_start``: the bytes before ended with LF (True for the first piece). For
    CRLF-clean bytes, the pieces followed by ``wire_ending`` are the encoder's output. A
    piece with no line starting with ``.`` comes back as the same object; otherwise one
    ``join`` copies it with the dots in. As everywhere here, a line starts after any LF,
    CR or not.
    """
    offsets = dot_stuffing_offsets(chunk, len(chunk), at_line_start)
    if not offsets:
        return chunk
    with memoryview(chunk) as view:
        segments = []
        start = 0
        for offset in offsets:
            segments.append(view[start:offset])
            start = offset
        segments.append(view[start:])
        # join puts one "." between neighbours: right before each dotted line.
        return b".".join(segments)


class CrlfNormaliser:
    """Stored bytes fed in pieces -> the same with every bare LF turned into CRLF.

    Delivery stores this form (as Dovecot's ``mail_save_crlf = yes`` does), so that a
    stored message is its own wire form but for dot-stuffing. A CR LF split between two
    pieces stays one line end; bare CRs and every other octet pass through unchanged.
    """

    __slots__ = ("_after_cr",)

    def __init__(self) -> None:
        self._after_cr = False

    def convert(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        after_cr, self._after_cr = self._after_cr, chunk[-1] == _CR
        return _to_crlf(chunk, after_cr)


def _to_crlf(chunk: bytes, after_cr: bool) -> bytes:
    """``chunk`` with every bare LF made CRLF; ``after_cr``: the piece before ended in CR.

    An LF opening the chunk after such a piece ends that CR's line: already CRLF.
    """
    head = b""
    if after_cr and chunk[:1] == b"\n":
        head, chunk = b"\n", chunk[1:]
    if b"\r" not in chunk:
        body = chunk.replace(b"\n", b"\r\n")
    elif chunk.count(b"\r\n") == chunk.count(b"\n"):
        body = chunk  # already CRLF throughout (or only bare CRs): nothing to do
    else:
        body = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return head + body if head else body


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
        self._at_line_start = True
        self._empty = True
        self._done = False

    @property
    def done(self) -> bool:
        """TOP has sent all it must; the rest of the message is not needed."""
        return self._done

    def encode(self, chunk: bytes) -> bytes:
        """Wire bytes for the next piece of the stored message.

        RETR's common chunks cost one or two C-level scans: a chunk already in wire
        form (CRLF throughout, no line starting with ``.``) comes back as the same
        object, and an LF-only chunk is one ``replace`` (and a ``join`` if a line in it
        starts with ``.``).
        """
        if self._done or not chunk:
            return b""
        if self._body_lines is None and not (self._after_cr and chunk[0] == _LF):
            at_line_start = self._at_line_start
            self._empty = False
            self._after_cr = chunk[-1] == _CR
            self._at_line_start = chunk[-1] == _LF
            # Stuffing before the LF->CRLF rewrite is the same (a line starts after
            # an LF either way) and scans the shorter string.
            if b"\r" not in chunk:
                # Typical Maildir content: LF line ends only.
                return stuff_wire_ready(chunk, at_line_start).replace(b"\n", b"\r\n")
            if chunk.count(b"\n") == chunk.count(b"\r\n"):
                # Already CRLF throughout (bare CRs pass through): only the dots.
                return stuff_wire_ready(chunk, at_line_start)
            lf_only = chunk.replace(b"\r\n", b"\n")
            return stuff_wire_ready(lf_only, at_line_start).replace(b"\n", b"\r\n")
        return self._encode_general(chunk)

    def _encode_general(self, chunk: bytes) -> bytes:
        """TOP, and a chunk whose LF completes a CR that ended the chunk before."""
        after_cr, self._after_cr = self._after_cr, chunk[-1] == _CR
        normal = _to_crlf(chunk, after_cr)
        if self._body_lines is not None:
            normal = self._cut_top(normal)
        if not normal:
            return b""
        self._empty = False
        stuffed = stuff_wire_ready(normal, self._at_line_start)
        self._at_line_start = normal.endswith(b"\n")
        return stuffed

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
        if self._empty or self._at_line_start:
            return _TERMINATOR
        self._at_line_start = True
        return b"\r\n" + _TERMINATOR


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
