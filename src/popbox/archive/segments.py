"""Cutting a message into the pieces the archive stores once each.

Two messages that carry the same attachment differ in their headers, their text and
their MIME boundaries, but the attachment's encoded body is the same octets in both.
So a message is cut at every line that can be a MIME boundary (a line starting with
``--``) and at the blank line that ends the headers after one (and the message's own
headers): an attachment's body then falls out as one piece whose octets, and so whose
digest, are the same in every message that carries it. Small neighbouring pieces
(headers, boundaries, short texts) are merged so a message is not stored as dozens of
tiny objects; a piece of ``MERGE_BELOW`` octets or more is always kept on its own, so
its digest never depends on what surrounds it.

No MIME parsing happens here: a stray ``--`` line in a text only makes one more cut.
Concatenating the pieces always gives back exactly the input. Works on any buffer
(bytes, a memoryview, an mmap of a file) with regex scans, never a loop per octet.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "MAX_PART_HEADERS",
    "MERGE_BELOW",
    "Octets",
    "RawPiece",
    "raw_pieces",
    "segment_ends",
    "split_segments",
]

Octets: TypeAlias = bytes | bytearray | memoryview | mmap.mmap
"""What the cutting reads: a message in memory or a file mapped into it."""

# Pieces below this are merged with small neighbours: a typical attachment is far
# larger, and a header block or a boundary line far smaller (a file system block is
# 4-8 KiB, so smaller objects cost a block each anyway).
MERGE_BELOW: Final = 8 * 1024

# Where a part's headers are looked for after its boundary line: far more than any
# real part's headers; past it the body is simply not cut from them.
MAX_PART_HEADERS: Final = 64 * 1024

# A line that may be a MIME boundary (RFC 2046 5.1.1: "--" then the boundary), after
# the line end before it: a literal prefix the regex engine scans for quickly.
_BOUNDARY_LINE: Final = re.compile(rb"\n(--[^\r\n]*(?:\r\n|\n|\r(?!\n)|\Z))")
_FIRST_BOUNDARY_LINE: Final = re.compile(rb"--[^\r\n]*(?:\r\n|\n|\r(?!\n)|\Z)")
# The blank line that ends a header block (LF, CRLF, or mixed).
_BLANK_LINE: Final = re.compile(rb"\n\r?\n")


@dataclass(frozen=True, slots=True)
class RawPiece:
    """One cut of a message before merging: ``data[start:end]``, and whether it is a
    part's body (else a header block, a boundary line and the headers after it)."""

    start: int
    end: int
    body: bool


def raw_pieces(data: Octets) -> list[RawPiece]:
    """The message cut at every boundary line and after every header block, in order;
    the pieces cover ``data`` exactly."""
    view = memoryview(data).cast("B")
    size = len(view)
    if size == 0:
        return []
    # (offset, whether what starts there is a body) for every cut.
    cuts: list[tuple[int, bool]] = [(0, False)]
    # (start, end) of every boundary line.
    boundaries = [line.span(1) for line in _BOUNDARY_LINE.finditer(view)]
    first = _FIRST_BOUNDARY_LINE.match(view)
    if first is not None:
        boundaries.insert(0, first.span())
    first_end = boundaries[0][0] if boundaries else size
    # The message's own headers end at its first blank line (or are all of it).
    blank = _BLANK_LINE.search(view, 0, first_end)
    if blank is not None:
        cuts.append((blank.end(), True))
    elif bytes(view[:1]) in (b"\n", b"\r"):
        cuts.append((0, True))
    for index, (start, end) in enumerate(boundaries):
        cuts.append((start, False))
        limit = boundaries[index + 1][0] if index + 1 < len(boundaries) else size
        # The part's headers end at the first blank line after the boundary line
        # (searched from its own line end, for a part without headers).
        blank = _BLANK_LINE.search(view, max(end - 1, start), min(limit, end + MAX_PART_HEADERS))
        cuts.append((blank.end() if blank is not None else end, True))
    # Two cuts at one offset leave an empty piece between them: what follows is
    # then a boundary, not a body.
    kinds: dict[int, bool] = {}
    for offset, body in cuts:
        kinds[offset] = kinds.get(offset, True) and body
    ordered = sorted(kinds.items())
    pieces: list[RawPiece] = []
    for (start, body), (end, _) in zip(ordered, [*ordered[1:], (size, False)], strict=True):
        if end > start:
            pieces.append(RawPiece(start, end, body))
    return pieces


def segment_ends(data: Octets) -> list[int]:
    """Where each stored piece of ``data`` ends (the last is ``len(data)``): raw
    pieces, small neighbours merged, a piece of MERGE_BELOW or more left alone."""
    ends: list[int] = []
    run_start = run_end = 0
    for piece in raw_pieces(data):
        if piece.end - piece.start >= MERGE_BELOW:
            if run_end > run_start:
                ends.append(run_end)
            ends.append(piece.end)
            run_start = run_end = piece.end
        else:
            run_end = piece.end
            if run_end - run_start >= MERGE_BELOW:
                ends.append(run_end)
                run_start = run_end
    if run_end > run_start:
        ends.append(run_end)
    return ends


def split_segments(data: bytes) -> list[bytes]:
    """``data`` as its stored pieces; ``b"".join(split_segments(data)) == data``."""
    out: list[bytes] = []
    start = 0
    for end in segment_ends(data):
        out.append(data[start:end])
        start = end
    return out
