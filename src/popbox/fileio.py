"""Small durable-file helpers shared by the store, the collector and user admin.

Kept apart from popbox.store so that `popbox fetch` can use them without importing
the store package.
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "write_all"]


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


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the entries of ``directory`` (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
