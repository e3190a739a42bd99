"""The TLS layer every TLS session runs on (``TlsLayer``): an ``ssl.SSLObject`` over two
memory BIOs between a socket's transport and a session. Its settings (the SSLContext,
the certificate) are net.tls_context's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

__all__ = ["TLS_RECORD_PLAINTEXT", "TlsLayer"]

# RFC 8446 section 5.1: a record carries at most 2^14 octets of plaintext, and one
# SSL_read returns at most one record, so this is all a read ever needs.
TLS_RECORD_PLAINTEXT: Final = 16 * 1024

# Decrypted bytes land here and are copied out at once, so the sessions of one process
# (one event loop thread) take turns with it: an idle TLS session keeps no read buffer
# of its own (uvloop's SSLProtocol allocates 256 KiB per connection).
_read_buffer = bytearray(TLS_RECORD_PLAINTEXT)
_read_view = memoryview(_read_buffer)

# A layer's states: handshaking; open; closing or closed after a handshake (the session
# hears of the loss); failed handshake (nobody but ``on_failed`` hears of anything).
_HANDSHAKE: Final = 0
_OPEN: Final = 1
_CLOSED: Final = 2
_FAILED: Final = 3


class TlsLayer(asyncio.Protocol, asyncio.Transport):
    """Server-side TLS between a socket's transport and a session's protocol.

    To the socket's transport it is the protocol; to the session it is the transport
    (write, writelines, close, abort, pause/resume_reading, write buffer limits). It
    runs an ``ssl.SSLObject`` over two memory BIOs and does nothing else, which is
    what an idle session needs: no per-connection read buffer, no write backlog (the
    socket transport's buffer is the only one, so its flow control is the session's),
    and a few attributes. ``on_ready`` runs when the handshake is done, before any
    decrypted byte is delivered (it attaches the session); ``on_failed`` gets the
    handshake's error, timeout or loss; after a failed handshake the socket is aborted.

    A graceful ``close`` sends close_notify behind the queued data and closes the
    socket once that is flushed, without waiting for the client's close_notify (POP3
    has nothing to say after the last reply; RFC 8446 section 6.1 allows it). A
    close_notify from the client reaches the session as end of file.
    """

    __slots__ = (
        "_app",
        "_error",
        "_incoming",
        "_on_failed",
        "_on_ready",
        "_outgoing",
        "_raw",
        "_reading_paused",
        "_sslobj",
        "_state",
        "_timer",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        handshake_timeout: float,
        *,
        on_ready: Callable[[TlsLayer], None],
        on_failed: Callable[[BaseException], None] | None = None,
        app: asyncio.Protocol | None = None,
    ) -> None:
        self._app = app
        self._on_ready: Callable[[TlsLayer], None] | None = on_ready
        self._on_failed = on_failed
        self._raw: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._state = _HANDSHAKE
        self._reading_paused = False
        # Why a TLS error after the handshake ended the connection, for the session.
        self._error: ssl.SSLError | None = None
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            handshake_timeout, self._handshake_timed_out
        )

    def set_app(self, app: asyncio.Protocol) -> None:
        """The protocol decrypted bytes go to (from ``on_ready`` at the latest)."""
        self._app = app

    def take_over(self, transport: asyncio.Transport) -> None:
        """Run over a connected transport (STLS, or after a PROXY header).

        Whatever the transport reads from now on is TLS; it is told to read again.
        """
        transport.set_protocol(self)
        self.connection_made(transport)
        transport.resume_reading()

    # -- the socket side (asyncio.Protocol) -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        self._raw = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._state >= _CLOSED:
            return
        self._incoming.write(data)
        if self._state == _HANDSHAKE:
            self._handshake()
        if self._state == _OPEN and not self._reading_paused:
            self._deliver()

    def eof_received(self) -> bool | None:
        if self._state == _HANDSHAKE:
            self._fail(ConnectionResetError("connection closed during the TLS handshake"))
        elif self._state == _OPEN:
            # The client closed without close_notify (a truncation attack cannot hurt a
            # POP3 server: a command is complete only with its CRLF).
            self._end_of_input()
        return None

    def pause_writing(self) -> None:
        if self._state in (_OPEN, _CLOSED) and self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._state in (_OPEN, _CLOSED) and self._app is not None:
            self._app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        self._cancel_timer()
        if state == _HANDSHAKE:
            self._state = _FAILED
            self._report_failure(exc or ConnectionResetError("connection lost"))
        elif state != _FAILED:
            self._state = _CLOSED
            if self._app is not None:
                self._app.connection_lost(self._error or exc)

    # -- the session side (asyncio.Transport) -----------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # The pieces are one stream cut into full records: a RETR's +OK line rides in
        # the body's first record and the terminator in its last, and a record is
        # copied only where it spans two pieces. Encrypted a record at a time, so the
        # outgoing memory BIO (which keeps its largest buffer for good) never holds
        # more than one record: a session that sent a 256 KiB RETR batch through it
        # would otherwise keep ~350 KiB while it idles. The records still leave in one
        # gathered write, as uvloop's do. Nothing of the caller's is kept afterwards.
        if self._state != _OPEN:
            return
        encrypt, outgoing = self._sslobj.write, self._outgoing
        pieces: list[bytes] = []
        # The start of the next record: parts of pieces, fewer than a record's octets.
        held: list[bytes | bytearray | memoryview] = []
        held_size = 0
        try:
            for data in list_of_data:
                size = len(data)
                if held_size + size < TLS_RECORD_PLAINTEXT:
                    if size:
                        held.append(data)
                        held_size += size
                    continue
                view = memoryview(data)
                start = 0
                if held:
                    start = TLS_RECORD_PLAINTEXT - held_size
                    held.append(view[:start])
                    encrypt(b"".join(held))
                    pieces.append(outgoing.read())
                    held = []
                    held_size = 0
                end = size - TLS_RECORD_PLAINTEXT
                while start <= end:
                    encrypt(view[start : start + TLS_RECORD_PLAINTEXT])
                    pieces.append(outgoing.read())
                    start += TLS_RECORD_PLAINTEXT
                if start < size:
                    held.append(view[start:])
                    held_size = size - start
            if held:
                encrypt(held[0] if len(held) == 1 else b"".join(held))
                pieces.append(outgoing.read())
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        raw = self._raw
        if pieces and raw is not None and not raw.is_closing():
            raw.writelines(pieces)

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """Send close_notify behind what is queued; the socket closes once it is out."""
        raw = self._raw
        if self._state == _HANDSHAKE:
            self.abort()
            return
        if self._state != _OPEN:
            return
        self._state = _CLOSED
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is written; the client's is not waited for
        except ssl.SSLError:
            pass  # the connection is broken anyway; close it
        self._flush()
        if raw is not None:
            raw.close()

    def abort(self) -> None:
        if self._state == _HANDSHAKE:
            self._cancel_timer()
        raw = self._raw
        if raw is not None:
            raw.abort()
        elif self._state == _HANDSHAKE:
            self._state = _FAILED
            self._report_failure(ConnectionAbortedError("TLS handshake aborted"))

    def is_closing(self) -> bool:
        raw = self._raw
        return self._state != _OPEN or raw is None or raw.is_closing()

    def pause_reading(self) -> None:
        if self._reading_paused:
            return
        self._reading_paused = True
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.resume_reading()
        # Records that arrived with the last read may be waiting in the TLS object.
        asyncio.get_running_loop().call_soon(self._deliver)

    def is_reading(self) -> bool:
        return not self._reading_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "peercert":
            return self._sslobj.getpeercert()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    # -- inside -----------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert tells the client why
            self._fail(exc)
            return
        self._flush()  # the server's last flight and session tickets
        self._cancel_timer()
        self._state = _OPEN
        on_ready, self._on_ready = self._on_ready, None
        self._on_failed = None
        if on_ready is not None:
            on_ready(self)

    def _deliver(self) -> None:
        """Hand decrypted records to the session until none is left or it pauses."""
        app = self._app
        incoming, sslobj = self._incoming, self._sslobj
        while self._state == _OPEN and not self._reading_paused and app is not None:
            if not incoming.pending and not sslobj.pending():
                # Nothing to decrypt: skip the read and its SSLWantReadError, which
                # otherwise ends every delivery (a Python exception per command).
                break
            try:
                # With a buffer, read() returns the count (typeshed says bytes).
                count = cast(int, sslobj.read(TLS_RECORD_PLAINTEXT, _read_buffer))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                count = 0
            except ssl.SSLError as exc:
                self._flush()
                self._fatal(exc)
                return
            if count == 0:
                self._end_of_input()
                return
            app.data_received(bytes(_read_view[:count]))
        if self._state == _OPEN:
            self._flush()  # a key update's reply, say

    def _end_of_input(self) -> None:
        app = self._app
        keep_open = app.eof_received() if app is not None else None
        if not keep_open:
            self.close()

    def _flush(self) -> None:
        data = self._outgoing.read()
        raw = self._raw
        if data and raw is not None and not raw.is_closing():
            raw.write(data)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._fail(TimeoutError("TLS handshake timed out"))

    def _fail(self, exc: BaseException) -> None:
        """The handshake failed: drop the connection and say so once."""
        self._state = _FAILED
        self._cancel_timer()
        if self._raw is not None:
            self._raw.abort()
        self._report_failure(exc)

    def _report_failure(self, exc: BaseException) -> None:
        on_failed, self._on_failed = self._on_failed, None
        self._on_ready = None
        if on_failed is not None:
            on_failed(exc)

    def _fatal(self, exc: ssl.SSLError) -> None:
        """A TLS error after the handshake: the session sees the connection lost by it."""
        self._state = _CLOSED
        self._error = exc
        if self._raw is not None:
            self._raw.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
