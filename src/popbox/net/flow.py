"""Flow control of one connection: its transport, paused reading and writing, the drain wait.

The shape is uvicorn's ``FlowControl``: one small object that the protocol tells when
the transport pauses or resumes writing, that pauses and resumes reading on request,
and that a writer awaits (``drain``) while the transport's buffer is over its
high-water mark. It also knows when the connection is lost, so that a waiting writer
is woken with ConnectionResetError rather than left hanging.
"""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = ["WRITE_HIGH_WATER", "WRITE_LOW_WATER", "FlowControl"]

# asyncio's default high-water mark is 64 KiB; 256 KiB keeps a fast link busy between
# event-loop turns during RETR while bounding what one slow reader can pin.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024


class FlowControl:
    """Pause and resume of one connection's reading and writing, and the drain waiter.

    ``transport`` is the one the session talks to: the socket's, or the TLS layer
    after STLS (``attach`` again). Once ``lost`` is set nothing is paused or resumed
    any more and ``drain`` raises ConnectionResetError.
    """

    # Thousands of idle sessions each hold one: no per-instance dict.
    __slots__ = ("_loop", "_waiter", "lost", "read_paused", "transport", "write_paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.read_paused = False
        self.write_paused = False
        self.lost = False
        # The writer waiting for the client to read (drain, or a send around the transport).
        self._waiter: asyncio.Future[None] | None = None

    def attach(self, transport: asyncio.Transport) -> None:
        """Take ``transport`` (a new connection's, or the TLS layer's after STLS).

        Neither direction is paused on a fresh transport; its write buffer gets our
        limits.
        """
        self.transport = transport
        self.read_paused = False
        self.write_paused = False
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    @property
    def waiting_on_client(self) -> bool:
        """True while a writer waits for the client to read what was sent."""
        return self._waiter is not None

    # -- reading --------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.lost:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.lost:
            self.read_paused = False
            self.transport.resume_reading()

    # -- writing --------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's buffer went over the high-water mark."""
        self.write_paused = True

    def resume_writing(self) -> bool:
        """The transport's buffer drained below the low-water mark.

        Returns True when a waiting writer was woken, False when nobody waited (the
        protocol may then go on with what it held back itself).
        """
        self.write_paused = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            return True
        return False

    async def drain(self) -> None:
        """Return once the transport wants more; raise ConnectionResetError if it is gone."""
        if self.lost:
            raise ConnectionResetError("connection lost")
        if not self.write_paused:
            return
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    async def wait_writable(self, waiter: asyncio.Future[None]) -> None:
        """Wait on ``waiter`` (a socket turning writable) as on the client's reading.

        For writes that go around the transport: meanwhile writing counts as paused,
        ``waiting_on_client`` is True, and a resume or the connection's loss wakes it
        as it would wake ``drain``.
        """
        self._waiter = waiter
        self.write_paused = True
        try:
            await waiter
        finally:
            self._waiter = None
            self.write_paused = False

    def connection_lost(self) -> None:
        """The connection is gone: a waiting writer gets ConnectionResetError."""
        self.lost = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
