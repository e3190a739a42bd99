"""One POP3 connection: an asyncio.Protocol that drives the sans-I/O ServerConnection.

The protocol core answers most commands by itself; this glue feeds it bytes, writes
what it queues, and acts on the few events that need I/O (login, RETR/TOP, QUIT,
STLS), each through the object that does that one job. Rules it keeps:

* Replies go out in order: the core's queued bytes are written before acting on an
  event, and no further command is read while an event is being handled.
* Memory stays bounded: reading pauses while an event is handled or the transport's
  write buffer is over its high-water mark (net.flow), so a client that pipelines
  hundreds of RETRs and never reads gets only a transport buffer's worth queued.
* A watchdog (net.watchdog) cuts clients that make no progress: before login
  ``login_timeout`` since the last complete command, after login ``idle_timeout``;
  a client that stops reading our output counts as idle too.
* STLS discards every byte received before the handshake (net.starttls).
* A SASL mechanism the core hands over (SCRAM, bearer tokens) runs step by step in
  a ``ServerMechanism`` from the hub (net.sasl); its end is a login like any other.
* Anything but QUIT in TRANSACTION releases the maildrop without deleting.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine
from typing import Any, Final, cast

from popbox.config import is_loopback
from popbox.net.announce import expire_text
from popbox.net.broker import Refused
from popbox.net.flow import FlowControl
from popbox.net.hub import SessionHub
from popbox.net.log import EndReason, SessionStats, next_session_id
from popbox.net.login import TEXT_AUTH_UNAVAILABLE, LoginEvent, VerifiedLogin
from popbox.net.outlet import TransportOutlet
from popbox.net.proxy import looks_like_header
from popbox.net.sasl import Continue, Rejected, SaslContext, ServerMechanism
from popbox.net.starttls import TlsUpgrade
from popbox.net.transaction import BodyInterrupted, TransactionStage
from popbox.net.watchdog import Watchdog
from popbox.proto.events import (
    FLUSH,
    NEED_DATA,
    ApopRequest,
    CloseConnection,
    ConnectionClosed,
    Event,
    LoginRequest,
    Quit,
    Retrieve,
    SaslExchange,
    StartTls,
)
from popbox.proto.replies import CODE_AUTH, CODE_SYS_TEMP, err
from popbox.proto.server import ServerConnection
from popbox.proto.state import SessionState

__all__ = ["Pop3Session"]

log = logging.getLogger("popbox.pop3")

# Sent before closing an idle session, as Dovecot does, so a human sees why.
IDLE_REPLY: Final = err("Disconnected for inactivity.")
TOO_MANY_CONNECTIONS_REPLY: Final = err("too many connections", CODE_SYS_TEMP)
SHUTDOWN_REPLY: Final = err("Server shutting down.", CODE_SYS_TEMP)
# To a PROXY header from a peer outside trusted_proxies (Dovecot says as little).
UNTRUSTED_PROXY_REPLY: Final = err("PROXY header not accepted from this address.")

# A tuple, not ``LoginRequest | ApopRequest``: that would build a union object on every
# event dispatched.
_LOGIN_EVENTS: Final = (LoginRequest, ApopRequest)


class Pop3Session(asyncio.Protocol):
    """One client connection, from greeting to logout line.

    It wires the parts and runs the event pump: ``FlowControl`` (pausing, the drain
    wait), ``Watchdog`` (timeouts), the hub's ``LoginBroker`` (login), ``TlsUpgrade``
    (STLS), and once logged in a ``TransactionStage`` writing to a ``TransportOutlet``.
    """

    # Thousands of idle sessions are the normal case: no per-instance dict, and the
    # outlet is made only at the first RETR.
    __slots__ = (
        "_closing",
        "_conn",
        "_counted",
        "_detail",
        "_flow",
        "_hub",
        "_ip",
        "_loop",
        "_mechanism",
        "_outlet",
        "_peer",
        "_pre_auth",
        "_real_ip",
        "_reason",
        "_refuse_proxy",
        "_sasl_failed",
        "_stage",
        "_stats",
        "_task",
        "_upgrade",
        "_user_slot",
        "_watchdog",
    )

    def __init__(
        self,
        hub: SessionHub,
        *,
        implicit_tls: bool,
        peer: tuple[str, int] | None = None,
        refuse_proxy_header: bool = False,
    ) -> None:
        """``peer`` overrides the socket's peer address (from a PROXY header);
        ``refuse_proxy_header``: a direct client on a PROXY listener, whose first bytes
        may not be a PROXY header (net.proxy)."""
        self._hub = hub
        self._peer = peer
        self._refuse_proxy = refuse_proxy_header
        self._loop = loop = hub.loop
        self._stats = SessionStats(next_session_id())
        # An implicit-TLS session starts on the TLS layer; over STLS it is set later.
        self._stats.tls = implicit_tls
        self._flow = FlowControl(loop)
        self._watchdog = Watchdog(loop)
        self._conn: ServerConnection | None = None
        self._stage: TransactionStage | None = None
        self._outlet: TransportOutlet | None = None
        self._ip = ""
        # The socket's own peer: the proxy's address behind a PROXY header.
        self._real_ip = ""
        self._counted = False
        # Counted against max_login_sessions until login succeeds or the session ends.
        self._pre_auth = False
        # The user whose session slot this session holds (max_sessions_per_user).
        self._user_slot: str | None = None
        self._task: asyncio.Task[None] | None = None
        # The SASL exchange the glue runs, between its steps.
        self._mechanism: ServerMechanism | None = None
        # Its failure was announced (Continue.failed) and its penalty served.
        self._sasl_failed = False
        # While STLS switches to TLS (see net.starttls).
        self._upgrade: TlsUpgrade | None = None
        self._closing = False
        self._reason: str | None = None
        self._detail: str | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        """The transport replies go to: the socket's, or the TLS layer's."""
        return self._flow.transport

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, so no isinstance.
        transport = cast(asyncio.Transport, transport)
        self._flow.attach(transport)
        own = transport.get_extra_info("peername")
        peer = self._peer or own
        host, port = (str(peer[0]), int(peer[1])) if peer else ("unknown", 0)
        self._peer = None
        self._ip = host
        self._real_ip = str(own[0]) if own else ""
        self._stats.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls_active = self._stats.tls
        if not self._hub.admit(self, host):
            self._write(TOO_MANY_CONNECTIONS_REPLY)
            self._close(EndReason.TOO_MANY_CONNECTIONS)
            return
        self._counted = True
        self._pre_auth = True
        if self._hub.shutting_down:
            self._write(SHUTDOWN_REPLY)
            self._close(EndReason.SHUTDOWN)
            return
        config = self._hub.config
        mode = config.pop3.plaintext_auth
        self._conn = ServerConnection(
            self._hub.settings,
            tls_active=tls_active,
            stls_available=self._hub.ssl_context is not None and not tls_active,
            plaintext_auth_allowed=(
                mode == "always" or tls_active or (mode == "loopback" and is_loopback(host))
            ),
        )
        self._write(self._conn.greeting())
        self._watchdog.arm(self)

    def data_received(self, data: bytes) -> None:
        upgrade = self._upgrade
        if (upgrade is not None and upgrade.discarding) or self._closing or self._conn is None:
            return  # CVE-2011-0411: nothing sent before the TLS handshake is a command
        if self._refuse_proxy:
            self._refuse_proxy = False
            if looks_like_header(data):
                self._refuse_proxy_header()
                return
        self._stats.commands += data.count(b"\n")
        if upgrade is not None:
            # Only the TLS layer calls us now, and only after the handshake: this is
            # the first protected data, which may come before _start_tls() resumes.
            self._tls_ready()
            self._conn.receive_data(data)
            return  # answered once _start_tls() has switched to the TLS layer
        self._conn.receive_data(data)
        if self._task is not None:
            # A command is still running (a pipelining client): keep what came and
            # read no more until it is done, the rest waits in the kernel's buffers.
            # Pausing here rather than for every command saves two epoll changes
            # per RETR for a client that waits for each reply.
            self._flow.pause_reading()
            return
        self._pump()

    def _refuse_proxy_header(self) -> None:
        # Only a trusted proxy may say where a connection comes from; anyone else
        # sending a header is misconfigured or pretending to be someone else.
        log.warning(
            "session=%s PROXY header from %s, which is not a trusted proxy: refused",
            self._stats.session_id, self._stats.peer,
        )  # fmt: skip
        self._write(UNTRUSTED_PROXY_REPLY)
        self._close(EndReason.PROXY_HEADER)

    def eof_received(self) -> bool | None:
        if self._conn is not None and not self._closing:
            self._conn.receive_data(b"")
            self._pump()
        # Keeping the socket half-open lets queued replies (QUIT's +OK) still go out;
        # over TLS an end of input is the client's close_notify (or a truncation), and
        # the TLS layer answers it with its own and closes.
        return not self._stats.tls

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._watchdog.progress()
        if not self._flow.resume_writing() and self._task is None and not self._closing:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        flow = self._flow
        if flow.lost:
            return  # a failed STLS handshake may report the loss twice
        self._closing = True
        self._close_outlet()
        if self._reason is None:
            # A TLS error after the handshake (a bad record, an alert) is the TLS
            # layer's reason for the loss: the log says which.
            tls_error = isinstance(exc, ssl.SSLError)
            self._reason = EndReason.TLS_ERROR if tls_error else EndReason.DISCONNECT
            if exc is not None:
                self._detail = str(exc) or type(exc).__name__
        self._watchdog.cancel()
        flow.connection_lost()
        if self._counted:
            self._counted = False
            self._hub.disconnected(self._ip)
        self._leave_login_stage()
        if self._task is None:
            self._finish()

    # -- the event pump -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._flow.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self._watchdog.progress()

    def _pump(self) -> None:
        """Run the core until it needs bytes or an event needs I/O (then spawn a task)."""
        conn = self._conn
        assert conn is not None
        flow = self._flow
        replied = False
        while self._task is None and not self._closing and self._upgrade is None:
            if flow.write_paused:
                # The client is not reading: stop reading too, so pipelined commands
                # stay in the kernel's buffers rather than ours.
                flow.pause_reading()
                return
            event = conn.next_event()
            output = conn.data_to_send()
            if output:
                self._write(output)
                replied = True
            if event is NEED_DATA:
                if replied:
                    self._watchdog.arm(self)
                flow.resume_reading()
                return
            if event is FLUSH:
                continue  # the loop's top waits for the transport if it is full
            self._dispatch(conn, event)

    def _dispatch(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, _LOGIN_EVENTS):
            self._spawn(self._login(conn, event))
        elif isinstance(event, SaslExchange):
            self._spawn(self._sasl(conn, event))
        elif isinstance(event, Retrieve):
            self._spawn(self._retrieve(conn, event))
        elif isinstance(event, Quit):
            self._spawn(self._quit(conn, event))
        elif isinstance(event, StartTls):
            self._upgrade = TlsUpgrade.begin(self._flow)
            self._spawn(self._start_tls(self._upgrade))
        elif isinstance(event, CloseConnection):
            self._close(event.reason or EndReason.ERROR)
        elif isinstance(event, ConnectionClosed):
            self._close(EndReason.DISCONNECT)
        else:
            raise TypeError(f"unexpected protocol event {event!r}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._task = self._loop.create_task(self._run(coro))

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except ConnectionError:
            self._close(EndReason.DISCONNECT, abort=True)
        except BodyInterrupted as exc:
            log.error("session=%s %s", self._stats.session_id, exc, exc_info=exc.__cause__)
            self._close(EndReason.ERROR, abort=True, detail=str(exc))
        except Exception as exc:
            # A bug must cost one session, never the server; the traceback goes to the
            # log and the client only sees the connection close.
            log.exception("session=%s internal error", self._stats.session_id)
            self._close(EndReason.ERROR, abort=True, detail=type(exc).__name__)
        finally:
            self._task = None
        if self._flow.lost:
            self._finish()
        elif not self._closing:
            self._pump()

    # -- the stages -----------------------------------------------------------------

    async def _sasl(self, conn: ServerConnection, event: SaslExchange) -> None:
        """One step of a glue-run SASL exchange; its end is a login like any other."""
        hub = self._hub
        broker = hub.broker
        if event.first:
            factory = hub.mechanisms.get(event.mechanism)
            if factory is None:  # offered by settings that were not built: our fault
                conn.login_failed(CODE_SYS_TEMP, TEXT_AUTH_UNAVAILABLE)
                return
            await broker.serve_penalty(self._ip)
            transport = self._flow.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            context = SaslContext(
                self._stats.session_id,
                self._ip,
                broker.login_owner,
                ssl_object if self._stats.tls else None,
                hub.server_certificate if self._stats.tls else None,
            )
            self._mechanism = factory(context)
            self._sasl_failed = False
        mechanism = self._mechanism
        if mechanism is None:  # the core starts every exchange with a first step
            raise RuntimeError(f"SASL step without an exchange: {event!r}")
        reply = await mechanism.step(event.data)
        if isinstance(reply, Continue):
            if reply.failed:
                self._sasl_failed = True
                await broker.refuse(self._ip, CODE_AUTH)
            conn.sasl_challenge(reply.challenge)
            return
        self._mechanism = None
        served, self._sasl_failed = self._sasl_failed, False
        if isinstance(reply, Rejected):
            log.info(
                "session=%s %s login failed: %s",
                self._stats.session_id, event.mechanism, reply.reason,
            )  # fmt: skip
            if not served:
                await broker.refuse(self._ip, reply.code)
            conn.login_failed(reply.code, reply.text)
            return
        verified = VerifiedLogin(reply.username, event.mechanism, reply.authzid, reply.credential)
        await self._login(conn, verified)

    async def _login(self, conn: ServerConnection, event: LoginEvent) -> None:
        # allow_real_nets is about the connection's own peer (the proxy), not the
        # address its PROXY header named; for a direct client the two are the same.
        login = await self._hub.broker.log_in(
            event, ip=self._ip, real_ip=self._real_ip or None, session_id=self._stats.session_id
        )
        if isinstance(login, Refused):
            conn.login_failed(login.code, login.text)
            return
        # A session logs in once: it cannot hold a slot already.
        self._user_slot = login.user
        stage = TransactionStage(login.maildrop, self._stats, self._stats.session_id)
        if self._flow.lost:
            await stage.release()  # the client left while we were looking
            return
        self._stage = stage
        view = login.view
        self._stats.logged_in(login.user, view.device, view.folder, recent=view.recent)
        self._leave_login_stage()
        policy = view.policy
        conn.login_succeeded(
            login.maildrop.messages,
            expire=expire_text(policy.retention_days),
            login_delay=policy.login_delay,
        )
        # The timeout changes with the state; the watchdog takes the new one from now.
        self._watchdog.rearm(self)

    async def _retrieve(self, conn: ServerConnection, event: Retrieve) -> None:
        assert self._stage is not None
        outlet = self._outlet
        if outlet is None:
            outlet = self._outlet = TransportOutlet(
                self._flow, self._watchdog, self._loop, tls=self._stats.tls
            )
            if self._closing:
                outlet.close()
        await self._stage.retrieve(conn, event, outlet)

    async def _quit(self, conn: ServerConnection, event: Quit) -> None:
        assert self._stage is not None
        reply = await self._stage.quit(conn, event)
        self._write(reply)
        self._write(conn.data_to_send())
        self._close(EndReason.QUIT)

    async def _start_tls(self, upgrade: TlsUpgrade) -> None:
        context = self._hub.ssl_context
        assert context is not None
        failure = await upgrade.switch(
            self._flow,
            self,
            context,
            self._hub.config.limits.tls_handshake_timeout,
            self._loop,
        )
        if failure is not None:
            self._upgrade = None
            detail = str(failure) or type(failure).__name__
            self._close(EndReason.TLS_FAILED, abort=True, detail=detail)
            # The TLS layer reports a loss during the handshake to nobody: do it here.
            self.connection_lost(None)
            return
        self._tls_ready()
        self._upgrade = None
        self._watchdog.progress()

    def _tls_ready(self) -> None:
        if not self._stats.tls:
            self._stats.tls = True
            assert self._conn is not None
            self._conn.tls_established()

    # -- the watchdog's questions (net.watchdog.Watched) ---------------------------

    @property
    def gone(self) -> bool:
        return self._flow.lost

    @property
    def waiting_on_us(self) -> bool:
        # A task not waiting on the client's reading waits on our backends.
        return self._task is not None and not self._flow.waiting_on_client

    def watch_timeout(self) -> float:
        limits = self._hub.config.limits
        if self._closing:
            # Only the last replies are left to deliver: no reason to wait as long as
            # for a logged-in user to think.
            return min(limits.login_timeout, limits.idle_timeout)
        if self._conn is not None and self._conn.state is SessionState.AUTHORIZATION:
            return limits.login_timeout
        return limits.idle_timeout

    def timed_out(self) -> None:
        if self._closing:
            # A graceful close waits for the client to read the last replies; one that
            # never does must not keep the connection (and its maildrop) forever.
            self._close(EndReason.TIMEOUT, abort=True)
        elif not self._flow.write_paused and self._upgrade is None:
            self._write(IDLE_REPLY)
            self._close(EndReason.TIMEOUT)
        else:
            self._close(EndReason.TIMEOUT, abort=True)

    # -- ending ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server is stopping: say so between commands, drop mid-command."""
        if self._closing:
            return
        if self._task is None and not self._flow.write_paused and self._upgrade is None:
            self._write(SHUTDOWN_REPLY)
            self._close(EndReason.SHUTDOWN)
        else:
            self._close(EndReason.SHUTDOWN, abort=True)

    def abort(self) -> None:
        """Drop the connection now (the maildrop is released without deleting)."""
        self._close(EndReason.SHUTDOWN, abort=True)

    def _close(self, reason: str, *, abort: bool = False, detail: str | None = None) -> None:
        if self._reason is None:
            self._reason = reason
            self._detail = detail
        self._closing = True
        self._close_outlet()
        transport = self._flow.transport
        if transport is None or self._flow.lost:
            return
        if abort:
            self._watchdog.cancel()
            transport.abort()
        else:
            # A graceful close flushes queued replies and, under TLS, sends close_notify;
            # the watchdog stays armed in case the client never reads them.
            transport.close()
            self._watchdog.arm(self)

    def _close_outlet(self) -> None:
        if self._outlet is not None:
            self._outlet.close()

    def _finish(self) -> None:
        """After connection_lost and any running task: release, log, unregister."""
        stage = self._stage
        if stage is not None and not stage.finished:
            self._task = self._loop.create_task(self._release_then_log(stage))
            return
        self._log_end()

    async def _release_then_log(self, stage: TransactionStage) -> None:
        try:
            await stage.release()
        finally:
            self._task = None
            self._log_end()

    def _leave_login_stage(self) -> None:
        if self._pre_auth:
            self._pre_auth = False
            self._hub.logged_in()

    def _log_end(self) -> None:
        if self._user_slot is not None:
            self._hub.broker.release_user(self._user_slot)
            self._user_slot = None
        self._stats.log_end(self._reason or EndReason.DISCONNECT, self._detail)
        self._hub.ended(self)
