"""RETR of a wire-ready stored file without re-encoding it (plain sockets, sendfile).

A message stored with CRLF line ends (store.base.WireReadyFile) is its own wire form
but for dot-stuffing. The file is read in windows only to find the lines that start
with ``.`` (one memchr per ".", popbox.wireform.DotStuffer.offsets), and the socket gets:

* long runs of the file with ``os.sendfile``: page cache to socket, no copy through
  Python and no encoder;
* short runs, the stuffing dots, the +OK line and the terminator gathered into one
  ``sendmsg`` of views into the window (a text message full of dotted lines is then
  one system call, not two per dot).

The file is read, not mapped: a mapping of a file that someone truncates meanwhile
kills the process with SIGBUS, a read just comes back short (an OSError here).

The bytes sent equal ``WireEncoder``'s output for the same file exactly (the tests
compare both). The caller owns the socket's ordering: nothing else may write to it
while this runs, and anything queued before must have left.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from typing import Final

from popbox.store.base import WireReadyFile
from popbox.wireform import DotStuffer

__all__ = ["READ_WINDOW", "SENDFILE_MIN", "send_wire_file"]

# The file is scanned this much at a time: the memory a RETR holds whatever the size.
READ_WINDOW: Final = 256 * 1024
# A run of the file at least this long goes out with sendfile; shorter ones are
# gathered into sendmsg with what surrounds them, where a system call per run would
# cost more than the copy it saves (a text message has a dotted line every ~1.5 KB).
SENDFILE_MIN: Final = 32 * 1024
# Pieces per sendmsg, well below Linux's IOV_MAX (1024).
MAX_IOV: Final = 512

WaitWritable = Callable[[int], Awaitable[None]]


async def send_wire_file(
    sock: socket.socket,
    head: bytes,
    file: WireReadyFile,
    wait_writable: WaitWritable,
    progress: Callable[[], None],
) -> int:
    """Send ``head``, the file's dot-stuffed wire form and the terminator on ``sock``.

    ``sock`` is non-blocking; ``wait_writable(fd)`` returns once it can take more (or
    raises ConnectionError), ``progress()`` is called whenever bytes left. Returns the
    octets sent after ``head`` (the body, its stuffing dots and the terminator).
    Raises ConnectionError if the peer leaves, another OSError if the file cannot be
    read or is shorter than ``file.size``.
    """
    size = file.size
    window = bytearray(min(size, READ_WINDOW))
    pending: list[bytes | memoryview] = [head]
    stuffed = 0
    stuffer = DotStuffer()
    offset = 0
    with memoryview(window) as view:
        while offset < size:
            count = os.preadv(file.fd, [view[: min(size - offset, READ_WINDOW)]], offset)
            if count == 0:
                raise OSError(f"message file ended {size - offset} octets early")
            dots = stuffer.offsets(window, count)
            stuffed += len(dots)
            if count < SENDFILE_MIN:
                # No run long enough for sendfile: the runs between dotted lines as
                # views, interleaved with the stuffing dots by one slice assignment.
                if dots:
                    bounds = zip([0, *dots], [*dots, count], strict=True)
                    runs = [view[start:stop] for start, stop in bounds]
                    gathered: list[bytes | memoryview] = [b"."] * (2 * len(runs) - 1)
                    gathered[::2] = runs
                    pending += gathered
                else:
                    pending.append(view[:count])
            else:
                start = 0
                for stop in [*dots, count]:
                    if stop - start >= SENDFILE_MIN:
                        # MSG_MORE: what is gathered waits for the run, no small segment.
                        await _sendmsg_all(sock, pending, socket.MSG_MORE, wait_writable, progress)
                        pending = []
                        await _sendfile_all(
                            sock, file.fd, offset + start, stop - start, wait_writable, progress
                        )
                    elif stop > start:
                        pending.append(view[start:stop])
                    if stop < count:
                        pending.append(b".")
                    start = stop
            offset += count
            if offset < size:
                # The views point into the window, which the next read overwrites.
                await _sendmsg_all(sock, pending, socket.MSG_MORE, wait_writable, progress)
                pending = []
        ending = stuffer.ending()
        pending.append(ending)
        await _sendmsg_all(sock, pending, 0, wait_writable, progress)
        pending = []
    return size + stuffed + len(ending)


async def _sendmsg_all(
    sock: socket.socket,
    pieces: list[bytes | memoryview],
    flags: int,
    wait_writable: WaitWritable,
    progress: Callable[[], None],
) -> None:
    first = 0
    while first < len(pieces):
        last_batch = first + MAX_IOV >= len(pieces)
        try:
            batch = pieces[first : first + MAX_IOV]
            sent = sock.sendmsg(batch, (), flags if last_batch else flags | socket.MSG_MORE)
        except BlockingIOError:
            await wait_writable(sock.fileno())
            continue
        progress()
        if sent == sum(map(len, batch)):
            # The usual case, the whole batch left: no Python step per piece.
            first += len(batch)
            continue
        # Drop what left; a piece sent in part is replaced by its rest.
        while first < len(pieces):
            length = len(pieces[first])
            if sent < length:
                if sent:
                    pieces[first] = memoryview(pieces[first])[sent:]
                break
            sent -= length
            first += 1


async def _sendfile_all(
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    wait_writable: WaitWritable,
    progress: Callable[[], None],
) -> None:
    out = sock.fileno()
    while count > 0:
        try:
            sent = os.sendfile(out, fd, offset, count)
        except BlockingIOError:
            await wait_writable(out)
            continue
        if sent == 0:
            raise OSError(f"message file ended {count} octets early")
        progress()
        offset += sent
        count -= sent
