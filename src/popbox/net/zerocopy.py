"""RETR of a wire-ready stored file without re-encoding it (plain sockets, sendfile).

A message stored with CRLF line ends (store.base.WireReadyFile) is its own wire form
but for dot-stuffing. The file is read in windows only to find the lines that start
with ``.``: one C-level ``re`` split per window at each "\\n." (the same search as
proto.wire.dot_stuffing_offsets, without a Python step per dot), and the socket gets:

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
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Final

from popbox.proto.wire import wire_ending
from popbox.store.base import WireReadyFile

__all__ = ["READ_WINDOW", "SENDFILE_MIN", "send_wire_file"]

# The file is scanned this much at a time: the memory a RETR holds whatever the size.
READ_WINDOW: Final = 256 * 1024
# A run of the file at least this long goes out with sendfile; shorter ones are
# gathered into sendmsg with what surrounds them, where a system call per run would
# cost more than the copy it saves (a text message has a dotted line every ~1.5 KB).
SENDFILE_MIN: Final = 32 * 1024
# Pieces per sendmsg, well below Linux's IOV_MAX (1024).
MAX_IOV: Final = 512
_LF: Final = 0x0A
_DOT: Final = 0x2E
# A line that starts with "." (after the first): the split point, and what goes out
# in its place (the dot doubled, RFC 1939 section 3).
_DOTTED_LINE: Final = re.compile(rb"\n\.")
_STUFFED: Final = b"\n.."

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
    last = 0
    at_line_start = True
    offset = 0
    with memoryview(window) as view:
        while offset < size:
            count = os.preadv(file.fd, [view[: min(size - offset, READ_WINDOW)]], offset)
            if count == 0:
                raise OSError(f"message file ended {size - offset} octets early")
            if at_line_start and window[0] == _DOT:
                pending.append(b".")
                stuffed += 1
            data = view[:count]
            # One C-level split at the dotted lines (views into the window, no copy);
            # a window without a "." at all (base64) costs one memchr.
            pieces = [data] if window.find(b".", 0, count) < 0 else _DOTTED_LINE.split(data)
            stuffed += len(pieces) - 1
            if count < SENDFILE_MIN:
                # No run long enough for sendfile: interleave the pieces with the
                # stuffed line starts by slice assignment, no Python step per dot.
                gathered: list[bytes | memoryview] = [_STUFFED] * (2 * len(pieces) - 1)
                gathered[::2] = pieces
                pending += gathered
            else:
                start = offset
                for index, piece in enumerate(pieces):
                    if index:
                        pending.append(_STUFFED)
                        start += 2  # the "\n." the split took out
                    length = len(piece)
                    if length >= SENDFILE_MIN:
                        # MSG_MORE: what is gathered waits for the run, no small segment.
                        await _sendmsg_all(sock, pending, socket.MSG_MORE, wait_writable, progress)
                        pending = []
                        await _sendfile_all(sock, file.fd, start, length, wait_writable, progress)
                    elif length:
                        pending.append(piece)
                    start += length
            del data, pieces
            last = window[count - 1]
            at_line_start = last == _LF
            offset += count
            if offset < size:
                # The views point into the window, which the next read overwrites.
                await _sendmsg_all(sock, pending, socket.MSG_MORE, wait_writable, progress)
                pending = []
        ending = wire_ending(size, last)
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
