"""The LMTP listener (RFC 2033) that an MTA such as Postfix delivers into.

Built on aiosmtpd's ``LMTP`` session; this module adds what LMTP needs beyond it:

* **One reply per recipient after DATA** (RFC 2033 section 4.2). aiosmtpd's DATA hook
  returns one status (aiosmtpd issue #517), and its own refusals after the data
  (too much data, a line too long) are single lines too. ``_LmtpSession`` therefore
  rewrites the reply to the final dot: our handler hands back one line per
  recipient, and a single transaction-wide line is repeated for every recipient,
  so the client never waits for answers that do not come.
* **Recipients checked at RCPT time**, as Dovecot does: an unknown user gets
  ``550 5.1.1`` right away and never takes part in the DATA replies.
* **PROXY headers from trusted load balancers only** (``lmtp.proxy_protocol``, TCP
  listeners): a peer in ``lmtp.trusted_proxies`` must open with a header, which
  aiosmtpd reads (``proxy_protocol_timeout``) and hands to ``handle_PROXY``; the
  log then names the MTA behind the balancer. Anyone else is served directly and
  gets ``421`` if it sends a header all the same. The unix socket ignores PROXY.
* **250 only once the message is durable**: the reply is sent after
  ``MailStore.deliver`` returns, which for Maildir is after fsync and rename into
  new/. A client that drops before the final dot delivers nothing (aiosmtpd cancels
  the session and the data is dropped); once the final dot has arrived the deliveries
  run to the end even if the client goes away, so no store write is cut in half.

Answers (the full table is in docs/delivery.md)::

    RCPT   250 2.1.5 ok | 550 5.1.1 unknown user | 451 4.3.0 user database down
           452 4.5.3 too many recipients
    DATA   250 2.0.0 saved | 452 4.2.2 / 552 5.2.2 over quota | 552 5.3.4 too big
           451 4.3.0 our storage fault
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
from collections.abc import Coroutine, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, Final, cast

from aiosmtpd.lmtp import LMTP
from aiosmtpd.proxy_protocol import V2_CMD, V2_SIGNATURE, ProxyData
from aiosmtpd.smtp import Envelope, Session

from popbox.config import Config, parse_listen
from popbox.config_scale import TrustedProxies
from popbox.delivery.deliverer import Deliverer, ResolvedRecipient
from popbox.errors import (
    MessageTooBig,
    QuotaExceeded,
    TemporaryDeliveryError,
    UnknownRecipient,
)

__all__ = ["LmtpService", "reply_for_error"]

log = logging.getLogger("popbox.lmtp")

# The recipient, timeout and line limits live in config.py (LmtpSettings) with
# their reasons, so an operator can override each.
# Dovecot's lmtp unix_listener mode: the MTA runs as its own user and must connect.
UNIX_SOCKET_MODE: Final = 0o666
# What the greeting names after the host name; no version, nothing to fingerprint.
IDENT: Final = "popbox LMTP"
# aiosmtpd's logger. It writes every command and connection event at INFO, five
# lines per delivery beside popbox's own one ("delivered to=..."), which is all that
# Dovecot's LMTP logs too; its chatter is kept for debug logging only.
AIOSMTPD_LOGGER: Final = "mail.log"
# A trusted balancer sends its header with the connection's first packet; one silent
# this long is not doing its job (aiosmtpd warns below 3 seconds).
PROXY_HEADER_TIMEOUT: Final = 10.0
# To a PROXY header from a peer that is not a trusted proxy, before closing (RFC 5321
# section 3.8: a server that closes the channel says 421 first).
UNTRUSTED_PROXY_REPLY: Final = b"421 4.7.0 PROXY header not accepted from this address\r\n"

# aiosmtpd's own replies, reworded with RFC 3463 enhanced status codes so that every
# answer an MTA logs says the same thing whichever layer produced it.
_AIOSMTPD_REPLIES: Final = {
    "552 Error: Too much mail data": "552 5.3.4 Message too big for system",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message too big for system"
    ),
    "500 Line too long (see RFC5321 4.5.3.1.6)": "552 5.3.4 Message line too long",
}


def _printable(address: str) -> str:
    """The address for an echo in a reply: never a CR, LF or an unencodable octet."""
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in address)


def reply_for_error(error: Exception, address: str = "") -> str:
    """The LMTP reply line for a delivery verdict (an exception from Deliverer)."""
    who = f"<{_printable(address)}> " if address else ""
    if isinstance(error, UnknownRecipient):
        return f"550 5.1.1 {who}User doesn't exist"
    if isinstance(error, QuotaExceeded):
        if error.permanent:
            return f"552 5.2.2 {who}Quota exceeded (mailbox is full)"
        return f"452 4.2.2 {who}Quota exceeded (mailbox is full)"
    if isinstance(error, MessageTooBig):
        return f"552 5.3.4 {who}Message too big for system"
    # TemporaryDeliveryError and anything unexpected: our fault, the MTA retries.
    return f"451 4.3.0 {who}Temporary internal error"


class _LmtpEnvelope(Envelope):
    """aiosmtpd's envelope plus the users that the accepted recipients resolved to."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[ResolvedRecipient] = []


class _Handler:
    """aiosmtpd hooks: MAIL, RCPT and DATA answered by the shared Deliverer."""

    def __init__(self, service: LmtpService) -> None:
        self._service = service
        self._deliverer = service.deliverer

    async def handle_EHLO(  # aiosmtpd finds hooks by these names
        self, server: Any, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        # The five-argument hook owns the greeting: it must record the name itself.
        session.host_name = hostname
        *extensions, last = responses
        # Dovecot's LMTP advertises both; aiosmtpd reads commands in order from one
        # stream and answers them in order, which is all PIPELINING asks of a server.
        return [*extensions, "250-ENHANCEDSTATUSCODES", "250-PIPELINING", last]

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: _LmtpEnvelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._service.config.lmtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        try:
            target = await self._deliverer.resolve(address)
        except UnknownRecipient as exc:
            log.info("rcpt refused from %s: %s", _show(session.peer), exc)
            return reply_for_error(exc, address)
        except TemporaryDeliveryError as exc:
            log.warning("rcpt deferred from %s: %s", _show(session.peer), exc)
            return reply_for_error(exc, address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.targets.append(target)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self, server: Any, session: Session, envelope: _LmtpEnvelope
    ) -> str:
        sender = envelope.mail_from
        # aiosmtpd keeps the null reverse-path of bounces as the text "<>".
        sender = "" if sender in (None, "<>") else sender
        data: bytes = envelope.original_content or b""
        # Shielded: once the final dot is in, a client that hangs up does not cut a
        # delivery in half; the replies are simply not read.
        task = self._service.track(self._deliver_all(envelope.targets, sender, data))
        replies = await asyncio.shield(task)
        return "\r\n".join(replies)

    async def _deliver_all(
        self, targets: Sequence[ResolvedRecipient], sender: str, data: bytes
    ) -> list[str]:
        replies = []
        # RFC 2033 wants a reply for every RCPT, even a repeated one; the mailbox
        # should still get the message once.
        done: dict[tuple[str, str], str] = {}
        for target in targets:
            address = target.recipient.address
            if (target.user, address) in done:
                replies.append(done[target.user, address])
                continue
            try:
                delivered = await self._deliverer.deliver_to(target, sender, data)
            except (UnknownRecipient, QuotaExceeded, MessageTooBig) as exc:
                log.info("not delivered to=%s: %s", address, exc)
                replies.append(reply_for_error(exc, address))
            except Exception as exc:
                # The edge of the delivery path: whatever went wrong is ours to log
                # and the MTA's to retry; it never sees a traceback.
                log.error("delivery to=%s failed: %s", address, exc, exc_info=exc)
                replies.append(reply_for_error(exc, address))
            else:
                key = _printable(delivered.key)
                replies.append(f"250 2.0.0 <{_printable(address)}> Saved as {key}")
            done[target.user, address] = replies[-1]
        return replies

    async def handle_PROXY(
        self, server: Any, session: Session, envelope: Envelope, proxy_data: ProxyData
    ) -> bool:
        # Only a trusted proxy's header gets here (_LmtpSession.connection_made).
        source = proxy_data.src_addr
        if proxy_data.command == V2_CMD.LOCAL or not isinstance(source, IPv4Address | IPv6Address):
            return True  # a health check, or no TCP client: the balancer's own address
        if isinstance(source, IPv6Address) and source.ipv4_mapped is not None:
            source = source.ipv4_mapped
        balancer = _show(session.peer)
        # aiosmtpd annotates peer as a string; it holds the peername tuple.
        session.peer = (str(source), proxy_data.src_port)  # type: ignore[assignment]
        log.info("connect from %s via proxy %s", _show(session.peer), balancer)
        return True

    async def handle_exception(self, error: Exception) -> str:
        log.error("LMTP session error: %s", error, exc_info=error)
        return "451 4.3.0 Temporary internal error"


class _LmtpSession(LMTP):
    """aiosmtpd's LMTP session with RFC 2033's per-recipient replies after DATA."""

    def __init__(
        self, service: LmtpService, handler: _Handler, *, proxied: bool, **kwargs: Any
    ) -> None:
        """``proxied``: on a PROXY listener (trust decides per connection)."""
        # Set before aiosmtpd's __init__, which sizes its StreamReader from it.
        self.line_length_limit = service.config.lmtp.max_line_length
        timeout = PROXY_HEADER_TIMEOUT if proxied else None
        super().__init__(handler, proxy_protocol_timeout=timeout, **kwargs)
        self._service = service
        self._owed = 0
        self._data_open = False
        self._refuse_proxy = False

    def _create_envelope(self) -> _LmtpEnvelope:
        return _LmtpEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._service.sessions.add(self)
        if self._proxy_timeout is not None and self.transport is None:
            # Not after STARTTLS (which calls this again): only a new connection.
            peer = transport.get_extra_info("peername")
            if not peer or str(peer[0]) not in self._service.trusted_proxies:
                self._proxy_timeout = None  # a direct client: greet it at once
                self._refuse_proxy = True
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refuse_proxy:
            self._refuse_proxy = False
            transport = cast(asyncio.Transport | None, self.transport)
            if data.startswith((b"PROXY ", V2_SIGNATURE[:5])) and transport is not None:
                log.warning(
                    "PROXY header from %s, which is not a trusted proxy: refused",
                    _show(transport.get_extra_info("peername")),
                )
                transport.write(UNTRUSTED_PROXY_REPLY)
                transport.close()
                return
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        self._service.sessions.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        # Count the recipients now: aiosmtpd resets the envelope before replying.
        self._owed = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        try:
            await super().smtp_DATA(arg)
        finally:
            self._owed = 0
            self._data_open = False

    async def push(self, status: str | bytes) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if not self._data_open:
            if self._owed and text.startswith("354"):
                self._data_open = True
            await super().push(_AIOSMTPD_REPLIES.get(text, text))
            return
        # The one reply to the final dot: expand it to one line per recipient.
        self._data_open = False
        lines = text.split("\r\n")
        if len(lines) != self._owed:
            # A verdict on the whole transaction applies to each recipient alike.
            lines = [_AIOSMTPD_REPLIES.get(text, text)] * self._owed
        for line in lines:
            await super().push(line)


class LmtpService:
    """LMTP listeners on config.lmtp.listen (TCP) and config.lmtp.socket (unix).

    ``deliverer`` (built by the composition root on the server's store and user
    database) answers RCPT and stores each message.
    """

    def __init__(self, config: Config, deliverer: Deliverer) -> None:
        self._config = config
        self.deliverer = deliverer
        _quiet_aiosmtpd()
        self._servers: list[asyncio.Server] = []
        self._socket_path: Path | None = None
        self.sessions: set[_LmtpSession] = set()
        self._deliveries: set[asyncio.Task[list[str]]] = set()
        self._trusted = TrustedProxies(config.lmtp.trusted_proxies)

    @property
    def config(self) -> Config:
        return self._config

    def track(self, coro: Coroutine[Any, Any, list[str]]) -> asyncio.Task[list[str]]:
        """Run a delivery as a task that stop() waits for."""
        task: asyncio.Task[list[str]] = asyncio.get_running_loop().create_task(coro)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        return task

    @property
    def trusted_proxies(self) -> TrustedProxies:
        return self._trusted

    def _new_session(self, *, tcp: bool = True) -> _LmtpSession:
        return _LmtpSession(
            self,
            _Handler(self),
            proxied=tcp and self._config.lmtp.proxy_protocol,
            data_size_limit=self._config.lmtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self._config.hostname,
            ident=IDENT,
            timeout=self._config.lmtp.timeout,
            loop=asyncio.get_running_loop(),
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound TCP (host, port) pairs; port 0 in the config shows the real port."""
        found = []
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    host, port = sock.getsockname()[:2]
                    found.append((host, port))
        return found

    @property
    def socket_path(self) -> Path | None:
        return self._socket_path

    async def start(self, *, sockets: Sequence[socket.socket] | None = None) -> None:
        """Listen on ``sockets`` (bound by the caller, e.g. before dropping root) or
        on config.lmtp.listen, and on the unix socket config.lmtp.socket if set."""
        loop = asyncio.get_running_loop()
        if sockets is not None:
            for sock in sockets:
                self._servers.append(await loop.create_server(self._new_session, sock=sock))
        else:
            for address in self._config.lmtp.listen:
                host, port = parse_listen(address)
                self._servers.append(
                    await loop.create_server(self._new_session, host, port, reuse_address=True)
                )
        path = self._config.lmtp.socket
        if path is not None:
            _remove_stale_socket(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            unix = functools.partial(self._new_session, tcp=False)
            self._servers.append(await loop.create_unix_server(unix, str(path)))
            os.chmod(path, UNIX_SOCKET_MODE)
            self._socket_path = path
        log.info(
            "LMTP listening on %s",
            ", ".join([f"{h}:{p}" for h, p in self.addresses] + [str(path or "")]).strip(", "),
        )

    async def stop(self) -> None:
        """Stop accepting, let deliveries in progress finish, then close every session.

        A session that has not reached its final dot delivers nothing; the MTA sees
        the connection close and retries, which is what LMTP's design counts on.
        """
        for server in self._servers:
            server.close()
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=self._config.limits.shutdown_grace)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._socket_path is not None:
            _remove_stale_socket(self._socket_path)
            self._socket_path = None


def _show(peer: object) -> str:
    """A peer as the POP3 log shows one: host:port, [v6]:port."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer or "local")


def _quiet_aiosmtpd() -> None:
    """Keep aiosmtpd's per-command INFO lines out of a log that is not at DEBUG.

    Its warnings and errors still come through; a level an operator set on its
    logger themselves is left alone.
    """
    chatty = logging.getLogger(AIOSMTPD_LOGGER)
    if chatty.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
        chatty.setLevel(logging.WARNING)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by an earlier run; refuse to remove anything else."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
