"""Sinks that hand each message to a mail server: LMTP (RFC 2033) and SMTP.

SmtpSink uses aiosmtplib. LmtpSink uses the standard library's ``smtplib.LMTP`` in a
worker thread, because aiosmtplib has no LMTP mode: its client reads exactly one reply
after DATA and drops replies it was not waiting for, while LMTP answers DATA once per
accepted recipient (RFC 2033 section 4.2). Driving aiosmtplib's private buffer to read
the extra replies would break on its next release; ``smtplib.LMTP`` (LHLO, unix sockets)
plus its public ``getreply()`` reads them with documented calls only.

Outcomes, per message:

- MAIL or RCPT refused: the transaction is reset before DATA, so nothing was
  delivered; any 4xx reply -> TemporarySinkError, otherwise PermanentSinkError.
- After DATA, SMTP's one reply decides: 2xx delivered, 4xx temporary, 5xx permanent.
- After DATA, LMTP's per-recipient replies decide: all 2xx delivered; any 4xx
  temporary; otherwise (some 5xx) permanent. Recipients that did get the message are
  remembered for this idempotency key, so the retry goes only to the others.
- Failures of the session itself (connection refused, TLS, greeting, AUTH, timeouts)
  say nothing about the message: TemporarySinkError.

The message is passed on unmodified; its idempotency key appears only in our logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import smtplib
import socket
import ssl
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import aiosmtplib

from popbox.collector.base import FetchedMessage
from popbox.errors import ConfigError, PermanentSinkError, SinkError, TemporarySinkError

if TYPE_CHECKING:
    from popbox.collector.config import LmtpSinkSettings, SmtpSinkSettings
    from popbox.collector.sinks import SinkContext

__all__ = ["LmtpSink", "SmtpSink", "create_sink"]

log = logging.getLogger(__name__)

# RFC 5321 section 4.5.3.2 suggests minutes per stage; one minute per reply suits a
# local MTA and keeps a stuck one from holding the account for long.
DEFAULT_TIMEOUT: Final = 60.0
# Partially delivered LMTP messages remembered for their retry; a bounded map, since
# an entry only matters until the poll engine's next attempt at that message.
PARTIAL_MEMORY_MAX: Final = 1024

Security = Literal["none", "starttls", "tls"]


def _outcome(code: int, what: str) -> SinkError:
    """The sink error for a refusing reply (RFC 5321 section 4.2.1: 4yz vs 5yz)."""
    if 400 <= code < 500:
        return TemporarySinkError(what)
    return PermanentSinkError(what)


def _reply(code: int, text: bytes | str) -> str:
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {' '.join(message.split())}"


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    # Verification is always on; ca_file adds a private CA, it never disables checks.
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


async def _read(message: FetchedMessage, sink: str) -> bytes:
    try:
        return await asyncio.to_thread(message.read_bytes)
    except OSError as exc:
        raise TemporarySinkError(f"{sink}: cannot read spooled message: {exc}") from exc


def _refusals(refused: list[tuple[str, int, str]]) -> SinkError:
    detail = "; ".join(f"<{rcpt}> {reply}" for rcpt, _, reply in refused)
    if any(400 <= code < 500 for _, code, _ in refused):
        return TemporarySinkError(f"recipients refused (will retry): {detail}")
    return PermanentSinkError(f"recipients refused: {detail}")


class _Target:
    """Where and how to connect; shared by both sinks."""

    def __init__(
        self,
        *,
        host: str | None,
        port: int,
        socket_path: Path | None,
        security: Security,
        ca_file: Path | None,
        sender: str,
        recipients: Sequence[str],
        timeout: float,
    ) -> None:
        if (host is None) == (socket_path is None):
            raise ConfigError("set exactly one of host and socket")
        if not recipients:
            raise ConfigError("at least one recipient is needed")
        self.host = host
        self.port = port
        self.socket_path = socket_path
        self.security = security
        self.ca_file = ca_file
        self.sender = sender
        self.recipients = list(recipients)
        self.timeout = timeout

    def describe(self, protocol: str) -> str:
        where = str(self.socket_path) if self.socket_path else f"{self.host}:{self.port}"
        return f"{protocol}:{where}"


class LmtpSink:
    """Deliver over LMTP, reading one reply per recipient after DATA."""

    def __init__(
        self,
        *,
        recipients: Sequence[str],
        host: str | None = None,
        port: int = 24,
        socket_path: Path | None = None,
        sender: str = "",
        security: Security = "none",
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        local_hostname: str | None = None,
        name: str | None = None,
    ) -> None:
        if security == "tls":
            # smtplib has no implicit-TLS LMTP client and no MTA offers one in practice.
            raise ConfigError("lmtp sink: tls = 'tls' is not supported; use 'starttls'")
        self._target = _Target(
            host=host, port=port, socket_path=socket_path, security=security,
            ca_file=ca_file, sender=sender, recipients=recipients, timeout=timeout,
        )
        self._local_hostname = local_hostname or socket.getfqdn()
        self._name = name or self._target.describe("lmtp")
        self._partial: OrderedDict[str, set[str]] = OrderedDict()

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        """Nothing to release: each delivery uses its own connection."""

    async def deliver(self, message: FetchedMessage) -> None:
        key = message.idempotency_key
        done = self._partial.get(key, set())
        pending = [r for r in self._target.recipients if r not in done]
        data = await _read(message, self._name)
        session = asyncio.ensure_future(asyncio.to_thread(self._transaction, data, pending))
        try:
            replies = await asyncio.shield(session)
        except asyncio.CancelledError:
            # The poll engine gave up waiting, but the thread cannot be stopped and may
            # still complete DATA; remember whom it reached so the retry skips them.
            session.add_done_callback(functools.partial(self._late_replies, key, done))
            raise
        except smtplib.SMTPDataError as exc:
            # DATA itself refused (e.g. 554 "no valid recipients"): the code decides.
            what = f"{self._name}: DATA refused: {_reply(exc.smtp_code, exc.smtp_error)}"
            raise _outcome(exc.smtp_code, what) from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise TemporarySinkError(f"{self._name}: {type(exc).__name__}: {exc}") from exc

        accepted = {rcpt for rcpt, code, _ in replies if 200 <= code < 300}
        failed = [(rcpt, code, text) for rcpt, code, text in replies if rcpt not in accepted]
        if not failed:
            self._partial.pop(key, None)
            log.info("%s delivered %s to %s", self._name, key, ", ".join(pending))
            return
        if accepted:
            self._remember(key, done | accepted)
            log.warning("%s delivered %s only to %s", self._name, key, ", ".join(accepted))
        raise _refusals(failed)

    def _late_replies(
        self, key: str, done: set[str], session: asyncio.Future[list[tuple[str, int, str]]]
    ) -> None:
        if session.cancelled() or session.exception() is not None:
            return  # nothing delivered, or nothing we can know about
        accepted = {rcpt for rcpt, code, _ in session.result() if 200 <= code < 300}
        if accepted:
            self._remember(key, done | accepted)
            log.warning("%s reached %s for %s after its timeout", self._name, accepted, key)

    def _remember(self, key: str, recipients: set[str]) -> None:
        self._partial[key] = recipients
        self._partial.move_to_end(key)
        while len(self._partial) > PARTIAL_MEMORY_MAX:
            self._partial.popitem(last=False)

    def _transaction(self, data: bytes, recipients: list[str]) -> list[tuple[str, int, str]]:
        """One LMTP session (in a worker thread); returns (recipient, code, reply)."""
        target = self._target
        where = str(target.socket_path) if target.socket_path else target.host
        assert where is not None  # _Target guarantees one of them
        with smtplib.LMTP(
            where, target.port, local_hostname=self._local_hostname, timeout=target.timeout
        ) as client:
            code, text = client.ehlo()  # smtplib.LMTP sends LHLO here
            if code != 250:
                raise smtplib.SMTPHeloError(code, text)
            if target.security == "starttls":
                client.starttls(context=_tls_context(target.ca_file))
                client.ehlo()
            options = []
            if client.has_extn("8bitmime") and not data.isascii():
                options.append("BODY=8BITMIME")
            code, text = client.mail(target.sender, options)
            if code != 250:
                client.rset()
                raise _outcome(code, f"{self._name}: MAIL refused: {_reply(code, text)}")
            accepted: list[str] = []
            refused: list[tuple[str, int, str]] = []
            for rcpt in recipients:
                code, text = client.rcpt(rcpt)
                if 200 <= code < 300:
                    accepted.append(rcpt)
                else:
                    refused.append((rcpt, code, _reply(code, text)))
            if refused:
                # Nothing is delivered yet: reset, so a retry cannot duplicate.
                client.rset()
                return refused
            code, text = client.data(data)  # the first recipient's reply
            replies = [(accepted[0], code, _reply(code, text))]
            for rcpt in accepted[1:]:
                try:
                    code, text = client.getreply()
                except (OSError, smtplib.SMTPException) as exc:
                    # Earlier recipients have the message; keep their 250s so the
                    # retry skips them, and count the rest as not delivered yet.
                    replies.append((rcpt, 451, f"no reply ({type(exc).__name__})"))
                    continue
                replies.append((rcpt, code, _reply(code, text)))
            with contextlib.suppress(OSError, smtplib.SMTPException):
                client.quit()  # the replies are in; a lost QUIT changes nothing
            return replies


class SmtpSink:
    """Relay each message to an SMTP server (aiosmtplib), all recipients or none."""

    def __init__(
        self,
        *,
        recipients: Sequence[str],
        host: str | None = None,
        port: int = 25,
        socket_path: Path | None = None,
        sender: str = "",
        security: Security = "none",
        ca_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        local_hostname: str | None = None,
        name: str | None = None,
    ) -> None:
        self._target = _Target(
            host=host, port=port, socket_path=socket_path, security=security,
            ca_file=ca_file, sender=sender, recipients=recipients, timeout=timeout,
        )
        if (username is None) != (password is None):
            raise ConfigError("smtp sink: username and password go together")
        self._username = username
        self._password = password
        self._local_hostname = local_hostname
        self._name = name or self._target.describe("smtp")

    def __repr__(self) -> str:
        return f"SmtpSink({self._name!r})"  # the password stays out of reprs

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        """Nothing to release: each delivery uses its own connection."""

    def _client(self) -> aiosmtplib.SMTP:
        target = self._target
        tls = target.security != "none"
        return aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            socket_path=str(target.socket_path) if target.socket_path else None,
            use_tls=target.security == "tls",
            # False, not None: never an opportunistic STARTTLS that may silently not be.
            start_tls=target.security == "starttls",
            tls_context=_tls_context(target.ca_file) if tls else None,
            username=self._username,
            password=self._password,
            timeout=target.timeout,
            local_hostname=self._local_hostname,
        )

    async def deliver(self, message: FetchedMessage) -> None:
        data = await _read(message, self._name)
        client = self._client()
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise TemporarySinkError(f"{self._name}: {type(exc).__name__}: {exc}") from exc
        try:
            await self._transaction(client, data)
        except aiosmtplib.SMTPResponseException as exc:
            raise _outcome(exc.code, f"{self._name}: {_reply(exc.code, exc.message)}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TemporarySinkError(f"{self._name}: {type(exc).__name__}: {exc}") from exc
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError):
                    client.close()
        log.info("%s delivered %s", self._name, message.idempotency_key)

    async def _transaction(self, client: aiosmtplib.SMTP, data: bytes) -> None:
        options = []
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        await client.mail(self._target.sender, options=options)
        refused: list[tuple[str, int, str]] = []
        for rcpt in self._target.recipients:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append((rcpt, exc.code, _reply(exc.code, exc.message)))
        if refused:
            # All or nothing: a partial relay would make the retry a duplicate.
            await client.rset()
            raise _refusals(refused)
        await client.data(data)


def create_sink(
    settings: LmtpSinkSettings | SmtpSinkSettings, context: SinkContext
) -> LmtpSink | SmtpSink:
    """Build the sink for ``settings`` (called by popbox.collector.sinks.build_sink)."""
    if settings.kind == "lmtp":
        return LmtpSink(
            recipients=settings.recipients,
            host=settings.host,
            port=settings.port,
            socket_path=settings.socket,
            sender=settings.sender,
            security=settings.tls,
            ca_file=settings.ca_file,
            timeout=settings.timeout,
            name=settings.label,
        )
    source = settings.password_source()
    return SmtpSink(
        recipients=settings.recipients,
        host=settings.host,
        port=settings.port,
        socket_path=settings.socket,
        sender=settings.sender,
        security=settings.tls,
        ca_file=settings.ca_file,
        username=settings.username,
        password=source.read() if source is not None else None,
        timeout=settings.timeout,
        name=settings.label,
    )
