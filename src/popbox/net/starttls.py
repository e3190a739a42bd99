"""STLS (RFC 2595 section 4): switching a plain session onto the TLS layer.

From STLS's +OK until the TLS layer owns the socket, whatever the session reads is
plaintext the client should not have sent: a command injected behind STLS must never
run as if it had come over TLS (CVE-2011-0411), so it is discarded, and reading is
paused so that the client's ClientHello stays in the kernel for the TLS layer. Once
the layer owns the socket, the session hears only decrypted bytes, and only after the
handshake; the protocol core then drops its buffer and starts the capability list
afresh (``ServerConnection.tls_established``).
"""

from __future__ import annotations

import asyncio
import ssl

from popbox.net.flow import FlowControl
from popbox.net.tls import TlsLayer

__all__ = ["TlsUpgrade"]


class TlsUpgrade:
    """One switch to TLS, from STLS's +OK to the end of the handshake.

    Made by ``begin`` when the core hands over the StartTls event; the session keeps
    it while the switch runs and reads ``discarding`` for every byte it receives.
    """

    __slots__ = ("_handshaking",)

    def __init__(self) -> None:
        self._handshaking = False

    @classmethod
    def begin(cls, flow: FlowControl) -> TlsUpgrade:
        """STLS's +OK is queued: from now on nothing read is a command (reading pauses)."""
        flow.pause_reading()
        return cls()

    @property
    def discarding(self) -> bool:
        """True while bytes reaching the session are plaintext sent before the
        handshake; False once only the TLS layer (after its handshake) calls it."""
        return not self._handshaking

    async def switch(
        self,
        flow: FlowControl,
        app: asyncio.Protocol,
        context: ssl.SSLContext,
        handshake_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> BaseException | None:
        """Put a TLS layer between ``flow``'s transport and ``app``, and attach it to
        ``flow`` once the handshake is done.

        Returns None then, or the handshake's failure (OSError, ssl.SSLError or
        TimeoutError; the socket is aborted and the layer reports the loss to nobody).
        Raises ConnectionError if the connection is lost before the handshake starts.
        """
        raw = flow.transport
        assert raw is not None
        # The +OK is in the raw transport's buffer; the TLS layer writes behind it.
        if flow.write_paused:
            await flow.drain()
        self._handshaking = True  # from here on only decrypted bytes reach the app
        waiter: asyncio.Future[None] = loop.create_future()
        layer = TlsLayer(
            context,
            handshake_timeout,
            on_ready=lambda _: _settle(waiter, None),
            on_failed=lambda exc: _settle(waiter, exc),
            app=app,
        )
        layer.take_over(raw)
        try:
            await waiter
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            return exc
        except asyncio.CancelledError:
            layer.abort()
            raise
        flow.attach(layer)
        return None


def _settle(waiter: asyncio.Future[None], exc: BaseException | None) -> None:
    if not waiter.done():
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)
