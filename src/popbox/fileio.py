"""Durable files and file locks, shared by the store, the collector and user admin.

Kept apart from popbox.store so that `popbox fetch` can use them without importing
the store package.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["FileLock", "fsync_dir", "replace_file", "write_all"]

# Lock files hold nothing secret, but they sit beside private mail and user data.
LOCK_FILE_MODE: Final = 0o600
# Files replaced whole (an index, a folder's device state) are private to their owner.
REPLACED_FILE_MODE: Final = 0o600


def write_all(fd: int, data: bytes) -> int:
    """os.write until every octet is written (a regular file may take less at once);
    returns ``len(data)``.

    Straight to the fd: a file object around it would add an fstat, an ioctl and an
    lseek to every message and index written, for one or two writes.
    """
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
    return written


def replace_file(
    directory: Path, name: str, tmp_name: str, parts: Iterable[bytes], *, durable: bool = True
) -> None:
    """Replace ``directory/name`` with ``parts`` as one whole file, never a partial one.

    Written to ``tmp_name`` beside it (no symlink followed), fsynced, then renamed
    into place; the temporary file is removed if anything fails. ``durable`` also
    fsyncs the directory, so the new file (not the old) is what a crash leaves.
    """
    tmp_path = directory / tmp_name
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp_path, flags, REPLACED_FILE_MODE)
    try:
        try:
            for part in parts:
                write_all(fd, part)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, directory / name)
    except BaseException:
        # The original error is the one worth reporting.
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the entries of ``directory`` (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileLock:
    """An exclusive ``flock`` on a file, held while this object's descriptor is open.

    flock, not fcntl locks: it conflicts between two opens in one process too (two
    sessions of one worker), and the kernel drops it when the holder dies, so a crash
    never wedges it. ``FileLock(path)`` creates the file if needed and raises
    BlockingIOError when another holder has it (``wait=True`` waits instead); any
    other OSError as it comes. ``close`` releases it, from any thread, any number of
    times; so does leaving a ``with`` block, and so does the garbage collector for a
    holder that was dropped without either (a crashed task must not keep it).
    """

    __slots__ = ("_fd", "_guard")

    def __init__(self, path: str | os.PathLike[str], *, wait: bool = False) -> None:
        self._guard = threading.Lock()
        self._fd = -1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @property
    def fd(self) -> int:
        """The locked file's descriptor (-1 once released), for a note kept in it."""
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        """Release the lock (closing the descriptor drops it). Idempotent."""
        with self._guard:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
