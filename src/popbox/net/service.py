"""The POP3 service: listeners (plain with STLS, and implicit TLS), and graceful shutdown.

``bind_sockets`` binds the configured addresses up front so that a root process can
bind ports 110/995 and then drop privileges, or hand the sockets to worker processes;
``Pop3Service.start`` serves on given sockets or binds its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Final

from popbox.auth.base import PassDB
from popbox.config import Config, Pop3Settings, parse_listen
from popbox.config_scale import TrustedProxies
from popbox.errors import ConfigError
from popbox.net.hub import SessionHub
from popbox.net.limits import AuthPenalty
from popbox.net.proxy import HeaderRefusal, ProxyAddress, ProxyHeaderReader
from popbox.net.sasl import Mechanisms
from popbox.net.session import Pop3Session
from popbox.net.tls import TlsLayer
from popbox.store.base import MailStore

__all__ = ["LISTEN_BACKLOG", "Pop3Service", "bind_addresses", "bind_sockets"]

log = logging.getLogger("popbox.pop3")

# Linux caps the accept queue at net.core.somaxconn (4096 on current kernels); a burst
# of logins (thousands of sessions) must not be refused by a short queue.
LISTEN_BACKLOG: Final = 4096
# Sessions told "shutting down" get this long to take the reply before they are dropped.
SHUTDOWN_FLUSH: Final = 1.0
# After the grace period sessions are dropped; releasing their maildrops is local work
# that should take milliseconds, so a store that hangs longer than this is abandoned.
CLEANUP_TIMEOUT: Final = 5.0

Address = tuple[str, int]


def _bind_one(address: str) -> socket.socket:
    host, port = parse_listen(address)
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A restarted server must be able to bind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "[::]:110" means IPv6 only; list "0.0.0.0:110" too for IPv4, as nginx does.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return sock


def bind_sockets(config: Config) -> tuple[list[socket.socket], list[socket.socket]]:
    """Bind ``config.pop3.listen`` and ``config.pop3.tls_listen``: (plain, tls) sockets.

    Raises ConfigError naming the address that could not be bound (and closes the
    sockets already bound).
    """
    plain = bind_addresses(config.pop3.listen)
    try:
        tls = bind_addresses(config.pop3.tls_listen)
    except BaseException:
        for sock in plain:
            sock.close()
        raise
    return plain, tls


def bind_addresses(addresses: Sequence[str]) -> list[socket.socket]:
    """Bind each ``HOST:PORT``; on failure close the ones bound and raise ConfigError."""
    bound: list[socket.socket] = []
    try:
        for address in addresses:
            bound.append(_bind_one(address))
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _address(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


class Pop3Service:
    """Serves POP3 on plain listeners (STLS when ``ssl_context``) and implicit-TLS ones."""

    def __init__(
        self,
        config: Config,
        store: MailStore,
        passdb: PassDB,
        ssl_context: ssl.SSLContext | None,
        mechanisms: Mechanisms | None = None,
    ) -> None:
        """``mechanisms``: the SASL mechanisms the glue runs (net.sasl)."""
        self._config = config
        self._ssl_context = ssl_context
        self._mechanisms = mechanisms
        self._store = store
        self._passdb = passdb
        self._hub: SessionHub | None = None
        self._servers: list[asyncio.Server] = []
        self._plain_addresses: list[Address] = []
        self._tls_addresses: list[Address] = []

    @property
    def plain_addresses(self) -> list[Address]:
        """(host, port) of each plain listener, as bound (port 0 resolved)."""
        return list(self._plain_addresses)

    @property
    def tls_addresses(self) -> list[Address]:
        """(host, port) of each implicit-TLS listener, as bound."""
        return list(self._tls_addresses)

    @property
    def penalty(self) -> AuthPenalty | None:
        """The per-address login penalty of this service's sessions (None before
        ``start``): whatever else takes logins with the same passwords (the web
        page) counts a guesser's failures in the same table."""
        return self._hub.penalty if self._hub is not None else None

    @property
    def session_count(self) -> int:
        """Sessions that have not finished yet (including their cleanup)."""
        return len(self._hub.sessions) if self._hub is not None else 0

    async def start(
        self,
        *,
        sockets: Sequence[socket.socket] | None = None,
        tls_sockets: Sequence[socket.socket] | None = None,
    ) -> None:
        """Start accepting. Without sockets, bind the configured addresses.

        Given sockets are in the order of ``pop3.listen`` and ``pop3.tls_listen``
        (as ``bind_sockets`` returns them): a ``proxy_protocol`` list names listeners
        by those entries.

        Implicit-TLS sockets need an ssl_context; without one they are closed and a
        warning logged (the embedded default without a certificate).
        """
        if self._servers:
            raise RuntimeError("Pop3Service already started")
        try:
            # First, so that a bad setting fails before any socket is bound.
            hub = SessionHub(
                self._config, self._store, self._passdb, self._ssl_context, self._mechanisms
            )
        except BaseException:
            for sock in [*(sockets or []), *(tls_sockets or [])]:
                sock.close()
            raise
        self._hub = hub
        if sockets is None and tls_sockets is None:
            sockets, tls_sockets = bind_sockets(self._config)
        sockets = list(sockets or [])
        tls_sockets = list(tls_sockets or [])
        if tls_sockets and self._ssl_context is None:
            log.warning("no TLS certificate: implicit-TLS listeners are not served")
            for sock in tls_sockets:
                sock.close()
            tls_sockets = []
        loop = asyncio.get_running_loop()
        settings = self._config.pop3
        trusted = TrustedProxies(settings.trusted_proxies)
        try:
            for index, sock in enumerate(sockets):
                factory: Callable[[], asyncio.BaseProtocol] = (
                    functools.partial(_proxy_reader, hub, trusted, implicit_tls=False)
                    if _proxied(settings, settings.listen, index)
                    else functools.partial(Pop3Session, hub, implicit_tls=False)
                )
                server = await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
                self._servers.append(server)
                self._plain_addresses.append(_address(sock))
            for index, sock in enumerate(tls_sockets):
                if _proxied(settings, settings.tls_listen, index):
                    # The PROXY header comes before the TLS handshake, in the clear.
                    factory = functools.partial(_proxy_reader, hub, trusted, implicit_tls=True)
                else:
                    # Our TLS layer rather than create_server(ssl=...): see TlsLayer.
                    factory = functools.partial(_tls_handshake, hub, peer=None)
                server = await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
                self._servers.append(server)
                self._tls_addresses.append(_address(sock))
        except BaseException:
            await self._close_listeners()
            for sock in sockets + tls_sockets:
                sock.close()  # those not yet served; closing twice is harmless
            raise
        for host, port in self._plain_addresses:
            log.info("POP3 listening on %s", _show(host, port))
        for host, port in self._tls_addresses:
            log.info("POP3S listening on %s", _show(host, port))

    async def shutdown(self) -> None:
        """Stop accepting, give sessions ``limits.shutdown_grace`` to QUIT, drop the rest.

        A dropped session commits nothing: its maildrop is released untouched.
        """
        hub = self._hub
        await self._close_listeners()
        if hub is None:
            return
        hub.shutting_down = True
        await hub.announcer.close()
        for layer in list(hub.handshakes):
            layer.abort()  # not a session yet: nothing to let finish
        grace = self._config.limits.shutdown_grace
        if hub.sessions and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.all_ended.wait(), grace)
        if hub.sessions:
            log.info("closing %d sessions still open after %.1fs", len(hub.sessions), grace)
            for session in list(hub.sessions):
                session.shutdown()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.all_ended.wait(), SHUTDOWN_FLUSH)
        if hub.sessions:
            for session in list(hub.sessions):
                session.abort()
            try:
                await asyncio.wait_for(hub.all_ended.wait(), CLEANUP_TIMEOUT)
            except TimeoutError:
                log.error("%d sessions did not finish their cleanup", len(hub.sessions))

    async def _close_listeners(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        # Server.wait_closed() also waits for every connection (3.12+); the listeners
        # are closed as soon as close() returns, which is all that matters here.
        await asyncio.sleep(0)


def _proxied(settings: Pop3Settings, entries: Sequence[str], index: int) -> bool:
    """Whether the ``index``-th socket of a listener kind expects PROXY headers."""
    if index < len(entries):
        return settings.proxied(entries[index])
    return settings.proxy_protocol is True  # a socket beyond the configured entries


def _proxy_reader(
    hub: SessionHub, trusted: TrustedProxies, *, implicit_tls: bool
) -> ProxyHeaderReader:
    """A connection's first protocol on a PROXY listener: a header from a trusted
    proxy, or a direct client that may not send one."""

    def on_header(transport: asyncio.Transport, address: ProxyAddress | None) -> None:
        peer = (address.host, address.port) if address is not None else None
        if not implicit_tls:
            session = Pop3Session(hub, implicit_tls=False, peer=peer)
            transport.set_protocol(session)
            session.connection_made(transport)
            transport.resume_reading()
            return
        _tls_handshake(hub, peer=peer).take_over(transport)

    def on_direct(transport: asyncio.Transport) -> None:
        if not implicit_tls:
            # Pop3Session refuses a header itself: it answers -ERR after its greeting.
            session = Pop3Session(hub, implicit_tls=False, refuse_proxy_header=True)
            transport.set_protocol(session)
            session.connection_made(transport)
            return
        refusal = HeaderRefusal(on_clean, hub.config.limits.tls_handshake_timeout)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)

    def on_clean(transport: asyncio.Transport, first: bytes) -> None:
        layer = _tls_handshake(hub, peer=None)
        layer.take_over(transport)
        layer.data_received(first)

    # The header is part of logging in: the pre-login timeout bounds it.
    return ProxyHeaderReader(
        on_header, hub.config.limits.login_timeout, trusted=trusted, on_direct=on_direct
    )


def _tls_handshake(hub: SessionHub, *, peer: tuple[str, int] | None) -> TlsLayer:
    """An implicit-TLS connection, which becomes a session once its handshake is done.

    ``peer`` is the client's address from a PROXY header (None: the socket's).
    """
    assert hub.ssl_context is not None

    def ready(layer: TlsLayer) -> None:
        hub.handshakes.discard(layer)
        session = Pop3Session(hub, implicit_tls=True, peer=peer)
        layer.set_app(session)
        session.connection_made(layer)

    def failed(exc: BaseException) -> None:
        hub.handshakes.discard(layer)
        # A failed handshake is not a session, only noise (scanners, health checks).
        log.debug("TLS handshake failed: %s", exc)

    layer = TlsLayer(
        hub.ssl_context,
        hub.config.limits.tls_handshake_timeout,
        on_ready=ready,
        on_failed=failed,
    )
    hub.handshakes.add(layer)
    return layer


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
