"""The IMAP sink's connections: TCP, TLS, login and a small pool of logged-in
IMAPClient connections, each used from one worker thread one call at a time.

IMAPClient (on imaplib) is synchronous: each connection's calls run in a worker
thread (``asyncio.to_thread``), and a connection is used by one delivery at a time
(at most ``settings.connections`` of them, opened lazily, reused across batches).

What this module raises:

- SinkUnavailable: the login is refused (password, or an OAuth2 token after the one
  refresh), there is no password or token to log in with, TLS fails (handshake,
  certificate, pin, no STARTTLS on offer): nothing can be delivered until that
  changes. After one refused login the pool knocks no more in this poll (servers lock
  accounts out that see a failed login per message);
- a TemporarySinkError caused by OAuthLoginRequired: the sink's stored OAuth2 login
  is dead (the poll engine finds the cause and asks for a new sign-in);
- ConnectionLost (Unreachable when no connection could be made at all): the caller
  tries a new connection once before giving up;
- Refused: a tagged NO or BAD, for the caller to judge.

Passwords and tokens never reach logs or error text: errors quote the server's
answers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from popbox.collector.tls import certificate_matches, client_tls_context
from popbox.errors import (
    CollectorError,
    ConfigError,
    OAuthLoginRequired,
    SinkUnavailable,
    TemporarySinkError,
)
from popbox.proto.sasl import oauthbearer_response, plain_response, xoauth2_response

if TYPE_CHECKING:
    from popbox.collector.config import ImapSinkSettings
    from popbox.collector.tokens import TokenProvider

__all__ = [
    "ConnectionLost",
    "ConnectionPool",
    "ImapConnection",
    "Refused",
    "Unreachable",
    "checked",
]

# The sink's logger: one name for everything the IMAP sink says.
log = logging.getLogger("popbox.collector.sinks.imap")

_T = TypeVar("_T")

# A tagged NO's response code, e.g. "append failed: [TRYCREATE] Mailbox ..." (imaplib
# puts the command name in front of the server's text).
_RESPONSE_CODE = re.compile(r"\[([A-Za-z0-9.-]+)")


class Refused(Exception):
    """A tagged NO (or BAD) to a command; ``code`` is its response code, if any."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        match = _RESPONSE_CODE.search(text)
        self.code = match.group(1).upper() if match else None


class ConnectionLost(Exception):
    """The connection broke (network, timeout, BYE): worth one new connection."""


class Unreachable(ConnectionLost):
    """No connection could be made (refused, no such host, timeout): worth one more
    try; after that the server is down for this poll."""


class ImapConnection:
    """One logged-in IMAPClient, used from one worker thread call at a time."""

    def __init__(self, client: IMAPClient) -> None:
        self.client = client
        self.broken = False
        self.capabilities: frozenset[bytes] = frozenset()
        # Between the event loop and the worker thread: is a call running, and was it
        # given up on (cancelled) while it ran?
        self._lock = threading.Lock()
        self._running = False
        self._abandoned = False

    def learn_capabilities(self) -> None:
        self.capabilities = frozenset(bytes(c).upper() for c in self.client.capabilities())

    @property
    def multiappend(self) -> bool:
        return b"MULTIAPPEND" in self.capabilities

    @property
    def append_limit(self) -> int | None:
        """The server-wide APPENDLIMIT=n (RFC 7889 section 3), if it has one."""
        for capability in self.capabilities:
            name, _, value = capability.partition(b"=")
            if name == b"APPENDLIMIT" and value.isdigit():
                return int(value)
        return None

    async def call(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run ``function(*args)`` in a worker thread; a broken connection raises
        ConnectionLost. A cancelled call leaves the connection unusable: its socket is
        shut (which ends the thread's wait) and closed once the thread lets go."""

        def run() -> _T:
            try:
                with self._lock:
                    if self._abandoned:
                        raise ConnectionLost("abandoned")
                return function(*args)
            finally:
                with self._lock:
                    self._running = False
                    abandoned = self._abandoned
                if abandoned:
                    self._shut()

        with self._lock:
            self._running = True
        try:
            return await asyncio.to_thread(run)
        except asyncio.CancelledError:
            with self._lock:
                self.broken = self._abandoned = True
                running = self._running
            if running:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self.client.socket(), socket.SHUT_RDWR)
            else:
                self._shut()
            raise
        except (ssl.SSLCertVerificationError, Refused, LoginError):
            raise
        except (OSError, imaplib.IMAP4.abort) as exc:
            self.broken = True
            raise ConnectionLost(str(exc) or type(exc).__name__) from exc

    async def discard(self) -> None:
        """Close a connection that is not to be used again (without LOGOUT)."""
        self.broken = True
        with self._lock:
            running = self._running
        if not running:
            await asyncio.to_thread(self._shut)

    def _shut(self) -> None:
        with contextlib.suppress(Exception):  # a connection that is going anyway
            self.client.shutdown()

    def close(self) -> None:
        """LOGOUT, or just close when that fails (called in a worker thread)."""
        try:
            self.client.logout()
        except Exception:  # a connection that is going anyway
            self._shut()


class ConnectionPool:
    """Up to ``settings.connections`` logged-in connections to the sink's server."""

    def __init__(self, settings: ImapSinkSettings, tokens: TokenProvider | None) -> None:
        self.settings = settings
        self._tokens = tokens
        self._idle: list[ImapConnection] = []
        self._slots = asyncio.Semaphore(settings.connections)
        # Why the server refused our login, once it did: the rest of this poll fails
        # fast instead of knocking again for every message (servers lock accounts out).
        self._login_refused: str | None = None
        self._context = (
            client_tls_context(
                settings.ca_file,
                settings.tls_fingerprint,
                server_name=settings.tls_server_name,
            )
            if settings.security != "none"
            else None
        )

    @property
    def name(self) -> str:
        return self.settings.label

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[ImapConnection]:
        """A logged-in connection (an idle one, or a new one) while a slot is free;
        back into the pool afterwards unless it broke."""
        await self._slots.acquire()
        connection: ImapConnection | None = None
        try:
            connection = await self._take()
            yield connection
        finally:
            if connection is not None:
                await self._give_back(connection)
            self._slots.release()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await asyncio.to_thread(connection.close)

    async def _take(self) -> ImapConnection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.broken:
                return connection
        return await self._open()

    async def _give_back(self, connection: ImapConnection) -> None:
        if connection.broken:
            await connection.discard()
        else:
            self._idle.append(connection)

    async def _open(self) -> ImapConnection:
        if self._login_refused is not None:
            raise SinkUnavailable(self._login_refused)
        host = self.settings.host
        try:
            client = await asyncio.to_thread(self._connect)
        except ssl.SSLError as exc:
            raise SinkUnavailable(f"{self.name}: TLS with {host}: {exc}") from exc
        except (OSError, imaplib.IMAP4.abort) as exc:
            raise Unreachable(f"cannot connect to {host}: {exc}") from exc
        except Refused as exc:
            raise SinkUnavailable(f"{self.name}: {host}: {exc}") from exc
        connection = ImapConnection(client)
        try:
            await self._log_in(connection)
            await connection.call(connection.learn_capabilities)
        except BaseException:
            await connection.discard()
            raise
        return connection

    def _connect(self) -> IMAPClient:
        """TCP, TLS (implicit or STARTTLS, never a plaintext fallback), pin check."""
        settings = self.settings
        client = IMAPClient(
            settings.host,
            port=settings.effective_port,
            ssl=settings.security == "tls",
            ssl_context=self._context,
            timeout=settings.timeout,
        )
        try:
            if settings.security == "starttls":
                if b"STARTTLS" not in {bytes(c).upper() for c in client.capabilities()}:
                    raise Refused("server does not offer STARTTLS; not falling back to plaintext")
                checked(client.starttls, self._context)
            if settings.tls_fingerprint is not None:
                der = client.socket().getpeercert(binary_form=True)
                if not certificate_matches(der, settings.tls_fingerprint):
                    raise Refused("server certificate does not match tls_fingerprint")
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    # ---------------------------------------------------------------- login

    async def _log_in(self, connection: ImapConnection) -> None:
        settings = self.settings
        if self._tokens is None:
            password = await self._password()
            await self._try_login(connection, self._password_login, password)
            return
        token = await self._token(force_refresh=False)
        try:
            await connection.call(self._oauth_login, connection, token)
        except LoginError as exc:
            # The token may have expired since it was handed out: one fresh one.
            log.info("imap sink=%s: token refused (%s); refreshing it", self.name, exc)
            token = await self._token(force_refresh=True)
            await self._try_login(connection, self._oauth_login, token)
        log.debug("logged in sink=%s user=%s", self.name, settings.username)

    async def _try_login(
        self,
        connection: ImapConnection,
        login: Callable[[ImapConnection, str], None],
        secret: str,
    ) -> None:
        try:
            await connection.call(login, connection, secret)
        except (LoginError, Refused) as exc:
            self._login_refused = f"{self.name}: login as {self.settings.username} refused: {exc}"
            raise SinkUnavailable(self._login_refused) from exc

    def _password_login(self, connection: ImapConnection, password: str) -> None:
        client = connection.client
        capabilities = {bytes(c).upper() for c in client.capabilities()}
        mechanism = self.settings.auth_mechanism
        if mechanism == "plain":
            if b"AUTH=PLAIN" not in capabilities:
                raise Refused("server does not offer AUTHENTICATE PLAIN")
            client.sasl_login(
                "PLAIN", _one_response(plain_response(self.settings.username, password))
            )
            return
        if b"LOGINDISABLED" in capabilities:
            raise Refused("server refuses LOGIN on this connection (LOGINDISABLED)")
        client.login(self.settings.username, password)

    def _oauth_login(self, connection: ImapConnection, token: str) -> None:
        client = connection.client
        user = self.settings.username
        mechanism = self.settings.auth_mechanism
        if mechanism == "auto":
            capabilities = {bytes(c).upper() for c in client.capabilities()}
            offers_bearer = b"AUTH=OAUTHBEARER" in capabilities
            mechanism = (
                "oauthbearer"
                if offers_bearer and b"AUTH=XOAUTH2" not in capabilities
                else "xoauth2"
            )
        if mechanism == "oauthbearer":
            client.sasl_login("OAUTHBEARER", _one_response(oauthbearer_response(user, token)))
        else:
            client.sasl_login("XOAUTH2", _one_response(xoauth2_response(user, token)))

    async def _password(self) -> str:
        source = self.settings.password_source()
        if source is None:  # the settings refuse this; kept for a clear error
            raise SinkUnavailable(f"{self.name}: no password configured")
        try:
            return await asyncio.to_thread(source.read)
        except ConfigError as exc:
            raise SinkUnavailable(f"{self.name}: {exc}") from exc

    async def _token(self, *, force_refresh: bool) -> str:
        assert self._tokens is not None
        try:
            return await self._tokens.token(force_refresh=force_refresh)
        except OAuthLoginRequired as exc:
            # Not SinkUnavailable: the poll engine looks for this cause and says that
            # `popbox oauth login ACCOUNT --sink LABEL` is what helps.
            raise TemporarySinkError(f"{self.name}: no access token: {exc}") from exc
        except CollectorError as exc:
            raise SinkUnavailable(f"{self.name}: no access token: {exc}") from exc


def checked(function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)``, its tagged NO or BAD as Refused (abort and OSError pass)."""
    try:
        return function(*args)
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as exc:
        if isinstance(exc, LoginError):
            raise
        raise Refused(str(exc)) from exc


def _one_response(response: bytes) -> Callable[[bytes], bytes]:
    """A SASL client that answers the first challenge with ``response`` and any later
    one (XOAUTH2's error report, RFC 7628 section 3.2.3) with an empty line."""
    answers = [response]

    def answer(challenge: bytes) -> bytes:
        return answers.pop() if answers else b""

    return answer
