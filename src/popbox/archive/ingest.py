"""A message made ready for the archive: its octets, digest, stored pieces and index
text, computed once and shared by every backend.

A message handed over as a file is mapped into memory rather than read (``mmap``):
hashing, cutting, compressing and extracting then run over the page cache, so a
50 MB message costs no 50 MB of the process's own memory, let alone several copies.
A small one is simply read. ``Prepared`` must be closed (a ``with`` block) once its
pieces are stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from popbox.archive.extract import Extracted, extract
from popbox.archive.segments import Octets, segment_ends
from popbox.errors import ArchiveError

__all__ = ["MAP_FILES_ABOVE", "Piece", "Prepared", "prepare"]

# A file of this size or more is mapped, not read: below it a read is cheaper than
# setting up and tearing down a mapping.
MAP_FILES_ABOVE: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Piece:
    """One stored piece: its SHA-256 (hex) and where it lies in the message."""

    digest: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class Prepared:
    """A message's octets (``data``), ``digest``, ``pieces`` and ``text``."""

    __slots__ = ("_map", "data", "digest", "pieces", "text")

    def __init__(self, data: Octets, mapping: mmap.mmap | None = None) -> None:
        self._map = mapping
        self.data: Octets = data
        view = memoryview(data).cast("B")
        self.digest = hashlib.sha256(view).hexdigest()
        pieces: list[Piece] = []
        start = 0
        ends = segment_ends(view)
        if len(ends) == 1:
            # One piece is the whole message: its digest is the message's.
            pieces.append(Piece(self.digest, 0, ends[0]))
        else:
            for end in ends:
                pieces.append(Piece(hashlib.sha256(view[start:end]).hexdigest(), start, end))
                start = end
        self.pieces: tuple[Piece, ...] = tuple(pieces)
        view.release()
        self.text: Extracted = extract(data)

    @property
    def size(self) -> int:
        return len(self.data)

    def piece(self, piece: Piece) -> memoryview:
        """The octets of ``piece`` (a view: no copy)."""
        return memoryview(self.data).cast("B")[piece.start : piece.end]

    def close(self) -> None:
        """Let go of a mapped file (views handed out must be released first)."""
        mapping, self._map = self._map, None
        if mapping is not None:
            # A cancelled caller's worker thread may still read it: then the mapping
            # goes when that thread lets go of its views.
            with contextlib.suppress(BufferError):
                mapping.close()

    def __enter__(self) -> Prepared:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def prepare(message: bytes | Path) -> Prepared:
    """``message`` (octets, or a file holding them) ready to store; ArchiveError if
    the file cannot be read."""
    if isinstance(message, bytes | bytearray | memoryview):
        return Prepared(bytes(message) if not isinstance(message, bytes) else message)
    try:
        fd = os.open(message, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < MAP_FILES_ABOVE:
                chunks: list[bytes] = []
                while chunk := os.read(fd, max(size, 65536)):
                    chunks.append(chunk)
                return Prepared(b"".join(chunks))
            mapping = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ArchiveError(f"cannot read {message}: {exc.strerror or exc}") from exc
    try:
        return Prepared(mapping, mapping)
    except BaseException:
        mapping.close()
        raise
