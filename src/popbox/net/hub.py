"""What every POP3 session of one service shares: settings, the login broker, the caps'
counts, and the set of live sessions that graceful shutdown walks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from pathlib import Path
from typing import Protocol

from popbox.auth.base import PassDB
from popbox.config import Config
from popbox.errors import ConfigError
from popbox.net.announce import Announcement, Announcer
from popbox.net.broker import LoginBroker
from popbox.net.limits import AuthPenalty
from popbox.net.sasl import Mechanisms
from popbox.net.tls import TlsLayer
from popbox.proto.sasl import CORE_MECHANISMS
from popbox.proto.server import ServerSettings
from popbox.store.base import MailStore

__all__ = ["LiveSession", "SessionHub"]

log = logging.getLogger("popbox.pop3")


class LiveSession(Protocol):
    """A running session, as graceful shutdown sees it."""

    def shutdown(self) -> None:
        """The server is stopping: say so between commands, drop mid-command."""
        ...

    def abort(self) -> None:
        """Drop the connection now (the maildrop is released without deleting)."""
        ...


class SessionHub:
    """What every session of one service shares: config, backends, and the live set.

    Tracks connections per peer IP and connections not logged in yet (for the caps),
    failed logins per IP (the penalty, which the broker applies), and the sessions
    that are still running (for graceful shutdown).
    """

    def __init__(
        self,
        config: Config,
        store: MailStore,
        passdb: PassDB,
        ssl_context: ssl.SSLContext | None,
        mechanisms: Mechanisms | None = None,
    ) -> None:
        """``mechanisms`` are the SASL mechanisms the glue runs (net.sasl). Offered are
        those of ``auth.mechanisms``, in its order, that the core runs (PLAIN, LOGIN)
        or ``mechanisms`` has; without ``mechanisms`` only the core's are offered, and
        one listed but not among those given is logged and left out."""
        self.config = config
        self.mechanisms: Mechanisms = dict(mechanisms or {})
        offered = tuple(
            name
            for name in config.auth.mechanisms
            if name in CORE_MECHANISMS or name in self.mechanisms
        )
        if mechanisms is not None and len(offered) < len(config.auth.mechanisms):
            missing = ", ".join(n for n in config.auth.mechanisms if n not in offered)
            log.warning("auth.mechanisms: %s not set up for this service, not offered", missing)
        # RFC 5929 tls-server-end-point: the certificate every TLS session presents.
        self.server_certificate = (
            _certificate_der(config.tls_cert_path()) if ssl_context is not None else None
        )
        self.ssl_context = ssl_context
        # Made inside the loop (Pop3Service.start); sessions take it from here, as
        # get_running_loop() costs a getpid() syscall per call on Python 3.11.
        self.loop = asyncio.get_running_loop()
        try:
            self.settings = ServerSettings(
                implementation=config.pop3.implementation,
                apop_enabled=config.pop3.apop,
                mechanisms=offered,
                hostname=config.hostname,
                max_command_line=config.limits.max_command_line,
                max_sasl_line=config.limits.max_sasl_line,
                max_bad_commands=config.limits.max_bad_commands,
                max_auth_failures=config.limits.max_auth_failures,
            )
        except ValueError as exc:
            # The core is stricter than the config model (e.g. no spaces in
            # pop3.implementation, which goes on the wire in CAPA).
            raise ConfigError(f"pop3/hostname/limits: {exc}") from exc
        self.sessions: set[LiveSession] = set()
        self.per_ip: dict[str, int] = {}
        self.login_sessions = 0
        self.penalty = AuthPenalty(config.limits.auth_penalty_max)
        try:
            self.broker = LoginBroker(passdb, store, self.penalty, config.limits, config.mailbox)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        # EXPIRE and LOGIN-DELAY before login (net.announce): sessions made from now
        # on take the settings with the current bounds.
        self.announcer = Announcer(config.mailbox, passdb, self.loop, self._announce)
        self.shutting_down = False
        # Implicit-TLS connections still in their handshake, before they become sessions.
        self.handshakes: set[TlsLayer] = set()
        self.all_ended = asyncio.Event()
        self.all_ended.set()

    def _announce(self, announced: Announcement) -> None:
        self.settings = dataclasses.replace(
            self.settings,
            expire=announced.expire,
            expire_per_user=announced.expire_per_user,
            login_delay=announced.login_delay,
            login_delay_per_user=announced.login_delay_per_user,
        )

    def admit(self, session: LiveSession, ip: str) -> bool:
        """Register a new connection; False when ``ip`` is already at its cap."""
        self.announcer.maybe_refresh()
        self.sessions.add(session)
        self.all_ended.clear()
        limits = self.config.limits
        count = self.per_ip.get(ip, 0)
        if count >= limits.max_connections_per_ip:
            return False
        if self.login_sessions >= limits.max_login_sessions:
            return False
        self.per_ip[ip] = count + 1
        self.login_sessions += 1
        return True

    def logged_in(self) -> None:
        """A counted connection has left the login stage (it is no longer pre-auth)."""
        self.login_sessions -= 1

    def disconnected(self, ip: str) -> None:
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    def ended(self, session: LiveSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.all_ended.set()


def _certificate_der(path: Path) -> bytes | None:
    """The first certificate of a PEM file, as DER; None (logged) if it cannot be read,
    which leaves channel binding to tls-server-end-point unavailable."""
    try:
        pem = path.read_text(encoding="ascii")
        end = pem.index(_PEM_END) + len(_PEM_END)
        return ssl.PEM_cert_to_DER_cert(pem[pem.index(_PEM_BEGIN) : end])
    except (OSError, ValueError) as exc:
        log.warning("cannot read the certificate %s for channel binding: %s", path, exc)
        return None


_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"
