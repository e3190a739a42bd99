"""The wire form of a message (RFC 1939 sections 3 and 11): CRLF line ends, a final
CRLF, dot-stuffing and the octet sizes that follow from them. Imports nothing of popbox.

Everything that turns stored bytes into what RETR sends, or counts what it will send,
is here, for every side that needs it: ``wire_size`` and ``WireSizeCounter`` are the
size rule that STAT and LIST report (stores, delivery quotas); ``CrlfNormaliser`` is
what delivery stores (CRLF line ends, so that stored bytes are their own wire form but
for the dots); ``DotStuffer`` is the one dot-stuffing state that every RETR path
carries across its chunks (the protocol's ``WireEncoder``, the transport's wire-ready
stream, the zero-copy sendfile path). Nothing but line endings and leading dots
changes: bare CR, NUL, 8-bit bytes and long lines pass through. This is the hot path
of 200 MB messages, so it works with whole-chunk bytes operations (replace, find,
count) rather than a step per line.
"""

from __future__ import annotations

import mmap
from typing import Final, TypeAlias

__all__ = [
    "TERMINATOR",
    "CrlfNormaliser",
    "DotStuffer",
    "Searchable",
    "WireSizeCounter",
    "dot_stuffing_offsets",
    "to_crlf",
    "to_wire",
    "wire_size",
]

# The line that ends a multi-line reply (RFC 1939 section 3).
TERMINATOR: Final = b".\r\n"
_CRLF_TERMINATOR: Final = b"\r\n" + TERMINATOR
# Octet values, so the hot path compares ints instead of slicing one-byte strings.
_LF: Final = 0x0A
_CR: Final = 0x0D


def wire_size(data: bytes) -> int:
    """Octets RETR sends for ``data`` before dot-stuffing (what STAT and LIST report).

    Every bare LF becomes CRLF and a message that does not end in a line ending gets
    a final CRLF. An empty message stays empty. Three C-level passes: a cold login
    sizes 100,000 small files with this.
    """
    if not data:
        return 0
    size = len(data) + data.count(b"\n") - data.count(b"\r\n")
    return size if data[-1] == _LF else size + 2


class WireSizeCounter:
    """``wire_size`` of data fed in pieces, and the sizes a Maildir name records.

    Carries the last byte across pieces so that a CR LF split between two chunks
    counts as one line ending, exactly as if the whole message were counted at once.
    """

    __slots__ = ("_crlf", "_last", "_lf", "_octets")

    def __init__(self) -> None:
        self._octets = 0
        self._lf = 0
        self._crlf = 0
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._octets += len(chunk)
        self._lf += chunk.count(b"\n")
        self._crlf += chunk.count(b"\r\n")
        if self._last == b"\r" and chunk[:1] == b"\n":
            self._crlf += 1
        self._last = chunk[-1:]

    @property
    def stored(self) -> int:
        """Octets fed so far, as they are stored."""
        return self._octets

    @property
    def virtual(self) -> int:
        """Dovecot's "virtual size", what its W= field holds: every LF counted as CRLF,
        but no final CRLF added to a message that lacks one."""
        return self._octets + self._lf - self._crlf

    @property
    def terminated(self) -> bool:
        """Whether the data is empty or ends with a line end (then virtual == wire)."""
        return not self._octets or self._last == b"\n"

    @property
    def wire(self) -> int:
        """The wire size of everything fed so far (RETR adds the missing final CRLF)."""
        if not self._octets:
            return 0
        return self.virtual + (0 if self.terminated else 2)


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
        return to_crlf(chunk, after_cr)


def to_crlf(chunk: bytes, after_cr: bool) -> bytes:
    """``chunk`` with every bare LF made CRLF; ``after_cr``: the piece before ended in CR.

    An LF opening the chunk after such a piece ends that CR's line: already CRLF. A
    chunk already in that form comes back as the same object.
    """
    head = b""
    if after_cr and chunk[:1] == b"\n":
        head, chunk = b"\n", chunk[1:]
    body, rewrite = _lf_form(chunk)
    if rewrite:
        body = body.replace(b"\n", b"\r\n")
    return head + body if head else body


def to_wire(chunk: bytes, after_cr: bool, stuffer: DotStuffer) -> bytes:
    """The next piece of a stored message in wire form: bare LFs made CRLF (as
    ``to_crlf``) and dot-stuffed by ``stuffer``, which carries the message's state.

    The common pieces cost one or two C-level scans: a piece already in wire form
    (CRLF throughout, no line starting with ``.``) comes back as the same object, and
    an LF-only piece is one ``replace`` (and a ``join`` if a line in it starts with
    ``.``).
    """
    if not chunk:
        return chunk
    if after_cr and chunk[0] == _LF:
        # The LF ends the CR that ended the piece before: rare, so the general way.
        return stuffer.stuff(to_crlf(chunk, after_cr))
    # Stuffing before the LF->CRLF rewrite is the same (a line starts after an LF
    # either way) and scans the shorter string.
    lf_form, rewrite = _lf_form(chunk)
    stuffed = stuffer.stuff(lf_form)
    return stuffed.replace(b"\n", b"\r\n") if rewrite else stuffed


def _lf_form(chunk: bytes) -> tuple[bytes, bool]:
    """``chunk`` in the form that is cheapest to work on, and whether its LFs must then
    become CRLF: an LF-only chunk (typical Maildir content) and a chunk that is CRLF
    throughout (bare CRs pass through) as they are, a mixed one with its CRLFs made LF.
    """
    if b"\r" not in chunk:
        return chunk, True
    if chunk.count(b"\r\n") == chunk.count(b"\n"):
        return chunk, False
    return chunk.replace(b"\r\n", b"\n"), True


# What dot_stuffing_offsets scans: anything with find() and the buffer protocol.
Searchable: TypeAlias = bytes | bytearray | mmap.mmap


def dot_stuffing_offsets(data: Searchable, length: int, at_line_start: bool = True) -> list[int]:
    """Offsets of the lines of ``data[:length]`` that start with ``.``, in order.

    For CRLF-clean bytes (no bare LF) this is the whole of dot-stuffing: the wire form
    is ``data`` with one more ``.`` before each offset, then the ending. A message
    scanned in pieces passes ``at_line_start``: whether the piece before ended with LF
    (``DotStuffer`` keeps that for its callers). As everywhere here, a line starts
    after any LF, CR or not.
    """
    offsets: list[int] = []
    if length <= 0:
        return offsets
    # One memchr per ".": base64 has none, so most of RETR's bytes cost one memchr in
    # all, and text has a few per line. That beats any search for the two octets "\n."
    # (bytes.find and replace run a general substring search, and re is slower still).
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


class DotStuffer:
    """Dot-stuffing of one message fed in pieces, and the ending that closes it.

    The one state every RETR path carries across its chunks: the last octet fed so far
    (a virtual LF before the first, so that the message starts at a line start and an
    empty message ends with the terminator alone). Feed it the message's pieces in
    order, each as it will go out but for the dots (LF or CRLF line ends: a line
    starts after any LF), through ``stuff`` (the dotted copy) or ``offsets`` (where the
    dots go, for a caller that sends the bytes itself); then send ``ending()``.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = _LF

    @property
    def at_line_start(self) -> bool:
        """Whether the next piece starts a line (nothing fed yet, or the last was LF)."""
        return self._last == _LF

    def stuff(self, chunk: bytes) -> bytes:
        """The next piece with a ``.`` before every line that starts with one.

        A piece with no such line comes back as the same object (no copy: most of a
        message's pieces); otherwise one ``join`` copies it with the dots in.
        """
        if not chunk:
            return chunk
        offsets = dot_stuffing_offsets(chunk, len(chunk), self._last == _LF)
        self._last = chunk[-1]
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

    def offsets(self, buffer: Searchable, length: int) -> list[int]:
        """``dot_stuffing_offsets`` of the next piece, ``buffer[:length]``, in order.

        For the zero-copy path, which sends the piece itself with a ``.`` before each
        offset; the state advances as ``stuff`` would advance it.
        """
        if length <= 0:
            return []
        offsets = dot_stuffing_offsets(buffer, length, self._last == _LF)
        self._last = buffer[length - 1]
        return offsets

    def ending(self) -> bytes:
        """What follows the last piece: a final CRLF if the message lacks one, then
        the terminating ``.`` line."""
        return TERMINATOR if self._last == _LF else _CRLF_TERMINATOR
