"""The archive's content-addressed object files: each stored piece once, compressed.

A piece lives at ``<root>/objects/<first 2 hex>/<sha256 hex>.zst`` (zstandard). It is
written to a temporary file beside its final name, fsynced and renamed, so a reader
or a crash only ever sees a whole object; the directory entries are made durable by
``sync`` before the index that names them commits. Reading streams it in chunks, so a
50 MB piece never sits in memory whole. Which objects are in use is the index's
business (popbox.archive.sqlite); this module only writes, reads and removes files.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import zstandard

from popbox.archive.segments import Octets
from popbox.fileio import fsync_dir, write_all

__all__ = [
    "COMPRESSION_LEVEL",
    "READ_CHUNK",
    "ObjectStore",
    "compress",
    "decompress",
]

# zstd's own default: near its best speed, a good ratio on mail text.
COMPRESSION_LEVEL: Final = 3
# Octets handed to the compressor, and read back, at a time: a bounded buffer that
# still keeps the per-call overhead small.
READ_CHUNK: Final = 256 * 1024
# Archived mail is private to the archive's owner.
OBJECT_MODE: Final = 0o600
DIRECTORY_MODE: Final = 0o700
# Temporary files younger than this may belong to a writer still at work.
STALE_TEMPORARY: Final = 3600.0
_TMP_PREFIX: Final = ".tmp-"
_SUFFIX: Final = ".zst"


def _compressor() -> zstandard.ZstdCompressor:
    # A new one per use: a compressor object must not be shared between threads.
    return zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)


def compress(data: Octets) -> bytes:
    """A small piece compressed in one go (the index keeps small pieces itself)."""
    return _compressor().compress(memoryview(data))


def decompress(data: bytes) -> bytes:
    """What ``compress`` made, whole (small pieces only)."""
    reader = zstandard.ZstdDecompressor().stream_reader(data)
    with reader:
        return reader.readall()


class ObjectStore:
    """Object files under ``root/objects``, named by the SHA-256 of their content."""

    def __init__(self, root: Path) -> None:
        self._dir = root / "objects"

    @property
    def directory(self) -> Path:
        return self._dir

    def path(self, digest: str) -> Path:
        return self._dir / digest[:2] / f"{digest}{_SUFFIX}"

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def write(self, digest: str, data: Octets) -> Path:
        """Write one object whole and fsynced (its directory entry is made durable by
        ``sync`` on the directory this returns the file of); replaces any file of that
        name, which can only hold the same content or a partial leftover."""
        target = self.path(digest)
        directory = target.parent
        if not directory.is_dir():
            if not self._dir.is_dir():
                self._dir.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
                fsync_dir(self._dir.parent)
            directory.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
            fsync_dir(self._dir)
        tmp = directory / f"{_TMP_PREFIX}{digest}-{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, OBJECT_MODE)
        try:
            try:
                compressor = _compressor().compressobj()
                view = memoryview(data).cast("B")
                for start in range(0, len(view), READ_CHUNK):
                    write_all(fd, compressor.compress(view[start : start + READ_CHUNK]))
                write_all(fd, compressor.flush())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return target

    @staticmethod
    def sync(paths: Iterable[Path]) -> None:
        """Make the directory entries of freshly written objects durable, each
        directory once."""
        for directory in {path.parent for path in paths}:
            fsync_dir(directory)

    def read(self, digest: str) -> Iterator[bytes]:
        """The object's original octets in chunks of at most READ_CHUNK."""
        with self.path(digest).open("rb") as file:
            reader = zstandard.ZstdDecompressor().stream_reader(file, read_size=READ_CHUNK)
            with reader:
                while chunk := reader.read(READ_CHUNK):
                    yield chunk

    def remove(self, digests: Iterable[str]) -> int:
        """Unlink objects no entry uses any more (after the index said so durably);
        returns how many files went. A missing file is already gone."""
        removed = 0
        directories: set[Path] = set()
        for digest in digests:
            path = self.path(digest)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
                directories.add(path.parent)
        for directory in directories:
            with contextlib.suppress(OSError):
                fsync_dir(directory)
        return removed

    def digests(self) -> Iterator[str]:
        """Every object on disk (whole ones; temporary files are not objects)."""
        if not self._dir.is_dir():
            return
        for directory in sorted(self._dir.iterdir()):
            if not directory.is_dir() or len(directory.name) != 2:
                continue
            for entry in os.scandir(directory):
                if entry.name.endswith(_SUFFIX) and not entry.name.startswith(_TMP_PREFIX):
                    yield entry.name[: -len(_SUFFIX)]

    def remove_temporaries(self, min_age: float = STALE_TEMPORARY) -> int:
        """Remove temporary files at least ``min_age`` seconds old: what a writer
        killed mid-write left behind (0 when no writer can be at work). Returns how
        many went."""
        if not self._dir.is_dir():
            return 0
        cutoff = time.time() - min_age
        removed = 0
        for directory in self._dir.iterdir():
            if not directory.is_dir():
                continue
            for entry in os.scandir(directory):
                if entry.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime <= cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed
