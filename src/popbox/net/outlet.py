"""Where the transaction stage writes: the session's transport behind its flow control,
and on a plain socket a zero-copy path around it (net.zerocopy).

The zero-copy path writes to a duplicate of the socket, so it must not overtake what
the transport still holds: every byte written through the transport is flushed first.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

from popbox.net.flow import WRITE_HIGH_WATER, WRITE_LOW_WATER, FlowControl
from popbox.net.watchdog import Watchdog
from popbox.net.zerocopy import send_wire_file
from popbox.store.base import WireReadyFile

__all__ = ["TransportOutlet"]


class TransportOutlet:
    """The ``Outlet`` (net.transaction) of one logged-in session.

    Made at the session's first RETR or TOP (an idle session has none) and closed with
    the session. Every write counts as progress for the watchdog; a wait for the
    client to read goes through the session's ``FlowControl``.
    """

    __slots__ = ("_closed", "_file_socket", "_flow", "_loop", "_tls", "_watchdog")

    def __init__(
        self,
        flow: FlowControl,
        watchdog: Watchdog,
        loop: asyncio.AbstractEventLoop,
        *,
        tls: bool,
    ) -> None:
        """``tls``: the session runs on the TLS layer (fixed once logged in: STLS is
        accepted only before login), so there is no plain socket to send files to."""
        self._flow = flow
        self._watchdog = watchdog
        self._loop = loop
        self._tls = tls
        # send_file's duplicate of the socket, kept between RETRs (None while in use).
        self._file_socket: socket.socket | None = None
        self._closed = False

    def write(self, data: bytes) -> None:
        transport = self._flow.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self._watchdog.progress()

    def writelines(self, data: list[bytes]) -> None:
        # uvloop gathers the pieces into one writev: the +OK line, a body chunk and the
        # terminator leave in one syscall without being concatenated first.
        transport = self._flow.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(data)
            self._watchdog.progress()

    def drain(self) -> Coroutine[Any, Any, None]:
        # The flow control's own coroutine, not one awaiting it: a RETR drains once
        # per batch, and a second coroutine frame each time would buy nothing.
        return self._flow.drain()

    @property
    def can_send_files(self) -> bool:
        transport = self._flow.transport
        return (
            not self._tls
            and transport is not None
            and not transport.is_closing()
            and transport.get_extra_info("socket") is not None
        )

    async def send_file(self, head: bytes, file: WireReadyFile) -> int | None:
        await self._flush_transport()
        flow = self._flow
        transport = flow.transport
        if flow.lost or transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        # A duplicate of the socket: the loop refuses a second watcher on the
        # transport's own fd, and the duplicate stays this socket even if the transport
        # closes its fd meanwhile (its number could then name another connection).
        # It is made once per session, not per RETR (a dup, a getsockname and a close
        # each time), and closed with the session, never while a send uses it.
        sock, self._file_socket = self._file_socket, None
        if sock is None:
            raw = transport.get_extra_info("socket")
            try:
                sock = socket.fromfd(raw.fileno(), raw.family, raw.type)
            except OSError:
                return None  # out of descriptors: the caller streams it instead
        try:
            return await send_wire_file(
                sock, head, file, self._socket_writable, self._watchdog.progress
            )
        finally:
            if self._closed:
                sock.close()
            else:
                self._file_socket = sock

    def close(self) -> None:
        """The session is closing: close send_file's duplicate, so that the transport's
        close ends the TCP stream (one in use is closed when its send returns)."""
        self._closed = True
        sock, self._file_socket = self._file_socket, None
        if sock is not None:
            sock.close()

    async def _flush_transport(self) -> None:
        """Wait until every byte written through the transport is in the kernel's hands.

        What goes around the transport (send_file) must not overtake earlier replies.
        A low-water mark of 0 makes the transport call resume_writing once it is empty.
        """
        flow = self._flow
        transport = flow.transport
        while transport is not None and transport.get_write_buffer_size() > 0:
            transport.set_write_buffer_limits(0, 0)
            try:
                if flow.write_paused:
                    await flow.drain()
                else:
                    # Both asyncio and uvloop pause at once when the limits drop
                    # below the buffered size; this only guards against a loop that
                    # would not, without spinning.
                    await asyncio.sleep(0.001)
            finally:
                if not flow.lost:
                    transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            if flow.lost:
                raise ConnectionResetError("connection lost")

    async def _socket_writable(self, fd: int) -> None:
        """Wait until ``fd`` (a duplicate of our socket) can take more bytes.

        The wait counts as the client not reading: the watchdog cuts a session that
        stays here past its timeout, as it does one stuck in drain().
        """
        flow = self._flow
        if flow.lost:
            raise ConnectionResetError("connection lost")
        loop = self._loop
        waiter = loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await flow.wait_writable(waiter)
        finally:
            loop.remove_writer(fd)
        transport = flow.transport
        if flow.lost or transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
