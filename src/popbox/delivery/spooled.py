"""A message that arrives as a file (the collector's spool): measured, streamed with
trace headers in front, and compared with the copies a maildrop already holds.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Protocol, runtime_checkable

from popbox.wireform import WireSizeCounter

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "HEAD_OCTETS",
    "FileDeliveringStore",
    "MeasuredFile",
    "measure_file",
    "normalised_digest",
    "prefixed",
]

# How much of the file is read up front for what the trace headers depend on (the
# line ending of the first line, a Return-Path among the first header fields).
HEAD_OCTETS: Final = 64 * 1024
# Pieces in which a file is read to count its wire size: large enough that the
# counting (two bytes.count per piece) runs at memory speed.
READ_OCTETS: Final = 1024 * 1024


@runtime_checkable
class FileDeliveringStore(Protocol):
    """Stores that can stream a delivery from a file (MaildirStore does), so a large
    message is never held in memory whole."""

    async def deliver_file(self, user: str, source: BinaryIO) -> str: ...


@dataclass(frozen=True, slots=True)
class MeasuredFile:
    """What the delivery rules need to know of a file before it is stored."""

    octets: int
    """Its length as it is (what the size limit is checked against)."""
    wire_size: int
    """Octets RETR would send for it alone (popbox.wireform.wire_size)."""
    head: bytes
    """Its first HEAD_OCTETS octets."""


def measure_file(path: Path) -> MeasuredFile:
    """Read ``path`` once, in bounded pieces (blocking: run it in a thread)."""
    counter = WireSizeCounter()
    head = b""
    with path.open("rb") as source:
        while chunk := source.read(READ_OCTETS):
            if len(head) < HEAD_OCTETS:
                head += chunk[: HEAD_OCTETS - len(head)]
            counter.feed(chunk)
    return MeasuredFile(counter.stored, counter.wire, head)


def normalised_digest(data: bytes) -> str:
    """SHA-256 of ``data`` with CRLF as LF and one final newline, for comparing copies
    that may differ only in line ends (a store keeps CRLF, a final newline added)."""
    body = data.replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n"
    return hashlib.sha256(body).hexdigest()


class _Prefixed(io.RawIOBase):
    """``prefix`` then the rest of ``source``, as one readable stream."""

    def __init__(self, prefix: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._prefix:
            taken = min(len(view), len(self._prefix))
            view[:taken] = self._prefix[:taken]
            self._prefix = self._prefix[taken:]
            return taken
        data = self._source.read(len(view))
        view[: len(data)] = data
        return len(data)


def prefixed(prefix: bytes, source: BinaryIO) -> BinaryIO:
    """A stream of ``prefix`` followed by what is left of ``source`` (not closed)."""
    return io.BufferedReader(_Prefixed(prefix, source), READ_OCTETS)
