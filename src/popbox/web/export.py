"""A search result as an mbox download, streamed: one entry at a time, one chunk at a
time, so memory stays bounded whatever the result holds.

The format is mboxrd: each message opens with a ``From `` line (the sender and the
time it came in) and ends with an empty line; a line that would read as a ``From ``
line (``>*From ``) gets one more ``>``, which a mboxrd reader takes off again. The
message's own line ends are kept. Lines are quoted as they stream past: only the
start of a line matters, so a line split across chunks keeps the little of it that
decides (``_Quoter``).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Final

from popbox.archive.base import Archive, Entry, Query
from popbox.errors import NoSuchEntry

__all__ = ["EXPORT_NAME", "mbox_stream"]

EXPORT_NAME: Final = "popbox-export.mbox"
# ">*From " is decided within the first few octets of a line; a line start longer
# than this that is all '>' is quoted all the same (only that can match).
_FROM_LINE: Final = re.compile(rb">*From ")
_ADDRESS: Final = re.compile(r"[^\s<>]+@[^\s<>]+")


def _from_line(entry: Entry) -> bytes:
    """``From sender asctime``: the envelope line an mbox opens each message with."""
    found = _ADDRESS.search(entry.sender)
    sender = found.group(0) if found else "MAILER-DAEMON"
    stamp = time.asctime(time.gmtime(entry.received))
    return f"From {sender} {stamp}\n".encode("ascii", "replace")


class _Quoter:
    """mboxrd quoting of one message fed in chunks."""

    def __init__(self) -> None:
        # The start of the current line while it could still become ">*From ".
        self._head = b""
        self._at_line_start = True
        self.ends_with_newline = True

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for piece in chunk.splitlines(keepends=True):
            if self._at_line_start or self._head:
                piece = self._head + piece
                self._head = b""
                if not piece.endswith(b"\n") and _could_become_from(piece):
                    self._head = piece  # wait for more of this line's start
                    self._at_line_start = False
                    continue
                if _FROM_LINE.match(piece):
                    piece = b">" + piece
            out.append(piece)
            self._at_line_start = piece.endswith(b"\n")
        if out:
            self.ends_with_newline = out[-1].endswith(b"\n")
        return b"".join(out)

    def finish(self) -> bytes:
        rest, self._head = self._head, b""
        if rest and _FROM_LINE.match(rest):
            rest = b">" + rest
        if rest:
            self.ends_with_newline = rest.endswith(b"\n")
        return rest


def _could_become_from(start: bytes) -> bool:
    """A line start that more octets could still turn into ``>*From ``."""
    stripped = start.lstrip(b">")
    return b"From "[: len(stripped)] == stripped


async def mbox_stream(archive: Archive, user: str, query: Query) -> AsyncIterator[bytes]:
    """The user's entries that match ``query``, in id order, as one mboxrd stream."""
    async for entry in archive.entries(user, query):
        quoter = _Quoter()
        parts = [_from_line(entry)]
        try:
            async for chunk in archive.read(user, entry.id):
                parts.append(quoter.feed(chunk))
                yield b"".join(parts)
                parts = []
        except NoSuchEntry:
            continue  # removed while the export ran (retention, a delete)
        rest = quoter.finish()
        ending = b"" if (quoter.ends_with_newline and not rest) or rest.endswith(b"\n") else b"\n"
        yield b"".join(parts) + rest + ending + b"\n"
