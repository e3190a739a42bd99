"""One POP3 connection: an asyncio.Protocol that drives the sans-I/O ServerConnection.

The protocol core answers most commands by itself; this glue feeds it bytes, writes
what it queues, and acts on the few events that need I/O (login, RETR/TOP, QUIT,
STLS). Rules it keeps:

* Replies go out in order: the core's queued bytes are written before acting on an
  event, and no further command is read while an event is being handled.
* Memory stays bounded: reading pauses while an event is handled or the transport's
  write buffer is over its high-water mark, so a client that pipelines hundreds of
  RETRs and never reads gets only a transport buffer's worth queued.
* A watchdog cuts clients that make no progress: before login ``login_timeout`` since
  the last complete command (so a byte-a-minute slow-loris does not reset it), after
  login ``idle_timeout``; a client that stops reading our output counts as idle too.
* STLS discards every byte received before the handshake (CVE-2011-0411).
* Anything but QUIT in TRANSACTION releases the maildrop without deleting.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Coroutine
from typing import Any, Final, cast

from popbox.auth.base import PassDB
from popbox.config import Config, is_loopback
from popbox.errors import ConfigError, MaildropInUse, PermanentStoreError, StoreError
from popbox.net.limits import AuthPenalty
from popbox.net.log import EndReason, SessionStats
from popbox.net.login import CODE_AUTH, authenticate
from popbox.net.tls import TlsLayer
from popbox.net.transaction import BodyInterrupted, TransactionStage
from popbox.net.zerocopy import send_wire_file
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
    StartTls,
)
from popbox.proto.server import ServerConnection, ServerSettings
from popbox.proto.state import SessionState
from popbox.store.base import MailStore, WireReadyFile

__all__ = ["Pop3Session", "SessionHub"]

log = logging.getLogger("popbox.pop3")

# asyncio's default high-water mark is 64 KiB; 256 KiB keeps a fast link busy between
# event-loop turns during RETR while bounding what one slow reader can pin.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
# Sent before closing an idle session, as Dovecot does, so a human sees why.
IDLE_REPLY: Final = b"-ERR Disconnected for inactivity.\r\n"
TOO_MANY_CONNECTIONS_REPLY: Final = b"-ERR [SYS/TEMP] too many connections\r\n"
# RFC 3206: IN-USE is for "already in use"; Dovecot says the same for its per-user cap.
TOO_MANY_USER_SESSIONS: Final = "Too many sessions for this user."
SHUTDOWN_REPLY: Final = b"-ERR [SYS/TEMP] Server shutting down.\r\n"

_ids = itertools.count(1)
# The pid keeps ids unique across worker processes sharing one log; taken once per
# process rather than by a getpid() syscall per connection.
_id_prefix = f"{os.getpid():x}."


def _forked() -> None:
    global _id_prefix
    _id_prefix = f"{os.getpid():x}."


os.register_at_fork(after_in_child=_forked)


def _next_session_id() -> str:
    return f"{_id_prefix}{next(_ids):x}"


class SessionHub:
    """What every session of one service shares: config, backends, and the live set.

    Tracks connections per peer IP, connections not logged in yet and sessions per
    user (for the caps), failed logins per IP (the penalty), and the sessions that
    are still running (for graceful shutdown).
    """

    def __init__(
        self,
        config: Config,
        store: MailStore,
        passdb: PassDB,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.config = config
        self.store = store
        self.passdb = passdb
        self.ssl_context = ssl_context
        # Made inside the loop (Pop3Service.start); sessions take it from here, as
        # get_running_loop() costs a getpid() syscall per call on Python 3.11.
        self.loop = asyncio.get_running_loop()
        try:
            self.settings = ServerSettings(
                implementation=config.pop3.implementation,
                expire=config.pop3.expire,
                apop_enabled=config.pop3.apop,
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
        self.sessions: set[Pop3Session] = set()
        self.per_ip: dict[str, int] = {}
        self.per_user: dict[str, int] = {}
        self.login_sessions = 0
        self.penalty = AuthPenalty(config.limits.auth_penalty_max)
        self.shutting_down = False
        # Implicit-TLS connections still in their handshake, before they become sessions.
        self.handshakes: set[TlsLayer] = set()
        self.all_ended = asyncio.Event()
        self.all_ended.set()

    def admit(self, session: Pop3Session, ip: str) -> bool:
        """Register a new connection; False when ``ip`` is already at its cap."""
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

    def claim_user(self, user: str) -> bool:
        """Take one of ``user``'s session slots; False when they are all taken."""
        count = self.per_user.get(user, 0)
        if count >= self.config.limits.max_sessions_per_user:
            return False
        self.per_user[user] = count + 1
        return True

    def release_user(self, user: str) -> None:
        count = self.per_user.get(user, 0) - 1
        if count > 0:
            self.per_user[user] = count
        else:
            self.per_user.pop(user, None)

    def disconnected(self, ip: str) -> None:
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    def ended(self, session: Pop3Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.all_ended.set()


class Pop3Session(asyncio.Protocol):
    """One client connection, from greeting to logout line."""

    # Thousands of idle sessions are the normal case (issue 6): no per-instance dict.
    __slots__ = (
        "_closing",
        "_conn",
        "_counted",
        "_detail",
        "_drain_waiter",
        "_file_socket",
        "_hub",
        "_implicit_tls",
        "_ip",
        "_last_progress",
        "_loop",
        "_lost",
        "_peer",
        "_pre_auth",
        "_reading_paused",
        "_reason",
        "_stage",
        "_stats",
        "_task",
        "_timer",
        "_transport",
        "_upgrade",
        "_user_slot",
        "_write_paused",
    )

    def __init__(
        self, hub: SessionHub, *, implicit_tls: bool, peer: tuple[str, int] | None = None
    ) -> None:
        """``peer`` overrides the socket's peer address (from a PROXY header)."""
        self._hub = hub
        self._peer = peer
        self._loop = hub.loop
        self._implicit_tls = implicit_tls
        self._stats = SessionStats(_next_session_id())
        self._transport: asyncio.Transport | None = None
        self._conn: ServerConnection | None = None
        self._stage: TransactionStage | None = None
        self._ip = ""
        self._counted = False
        # Counted against max_login_sessions until login succeeds or the session ends.
        self._pre_auth = False
        # The user whose session slot this session holds (max_sessions_per_user).
        self._user_slot: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        # send_file's duplicate of the socket, kept between RETRs (None while in use).
        self._file_socket: socket.socket | None = None
        self._write_paused = False
        self._reading_paused = False
        # "discard": between STLS's +OK and the protocol switch, bytes are plaintext
        # the client should not have sent; "handshake": the TLS layer owns the socket.
        self._upgrade: str | None = None
        self._closing = False
        self._lost = False
        self._reason: str | None = None
        self._detail: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_progress = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, so no isinstance.
        self._transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = self._peer or transport.get_extra_info("peername")
        host, port = (str(peer[0]), int(peer[1])) if peer else ("unknown", 0)
        self._peer = None
        self._ip = host
        self._stats.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls_active = self._implicit_tls
        self._stats.tls = tls_active
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
        self._arm_watchdog()

    def data_received(self, data: bytes) -> None:
        if self._upgrade == "discard" or self._closing or self._conn is None:
            return  # CVE-2011-0411: nothing sent before the TLS handshake is a command
        self._stats.commands += data.count(b"\n")
        if self._upgrade == "handshake":
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
            self._pause_reading()
            return
        self._pump()

    def eof_received(self) -> bool | None:
        if self._conn is not None and not self._closing:
            self._conn.receive_data(b"")
            self._pump()
        # Keeping the socket half-open lets queued replies (QUIT's +OK) still go out;
        # over TLS an end of input is the client's close_notify (or a truncation), and
        # the TLS layer answers it with its own and closes.
        return not self._stats.tls

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_progress = self._loop.time()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif self._task is None and not self._closing:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return  # a failed STLS handshake may report the loss twice
        self._lost = True
        self._closing = True
        self._close_file_socket()
        if self._reason is None:
            # A TLS error after the handshake (a bad record, an alert) is the TLS
            # layer's reason for the loss: the log says which.
            tls_error = isinstance(exc, ssl.SSLError)
            self._reason = EndReason.TLS_ERROR if tls_error else EndReason.DISCONNECT
            if exc is not None:
                self._detail = str(exc) or type(exc).__name__
        self._cancel_watchdog()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        if self._counted:
            self._counted = False
            self._hub.disconnected(self._ip)
        self._leave_login_stage()
        if self._task is None:
            self._finish()

    # -- writing, with flow control (the transaction stage's Outlet) ----------------

    def write(self, data: bytes) -> None:
        self._write(data)

    def writelines(self, data: list[bytes]) -> None:
        # uvloop gathers the pieces into one writev: the +OK line, a body chunk and the
        # terminator leave in one syscall without being concatenated first.
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.writelines(data)
            self._last_progress = self._loop.time()

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiter = waiter
        try:
            await waiter
        finally:
            self._drain_waiter = None

    @property
    def can_send_files(self) -> bool:
        transport = self._transport
        return (
            not self._stats.tls
            and self._upgrade is None
            and transport is not None
            and not transport.is_closing()
            and transport.get_extra_info("socket") is not None
        )

    async def send_file(self, head: bytes, file: WireReadyFile) -> int | None:
        await self._flush_transport()
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
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
            return await send_wire_file(sock, head, file, self._socket_writable, self._progress)
        finally:
            if self._closing:
                sock.close()
            else:
                self._file_socket = sock

    def _close_file_socket(self) -> None:
        """Close send_file's duplicate, so that the transport's close ends the TCP stream."""
        sock, self._file_socket = self._file_socket, None
        if sock is not None:
            sock.close()

    async def _flush_transport(self) -> None:
        """Wait until every byte written through the transport is in the kernel's hands.

        What goes around the transport (send_file) must not overtake earlier replies.
        A low-water mark of 0 makes the transport call resume_writing once it is empty.
        """
        transport = self._transport
        while transport is not None and transport.get_write_buffer_size() > 0:
            transport.set_write_buffer_limits(0, 0)
            try:
                if self._write_paused:
                    await self.drain()
                else:
                    # Both asyncio and uvloop pause at once when the limits drop
                    # below the buffered size; this only guards against a loop that
                    # would not, without spinning.
                    await asyncio.sleep(0.001)
            finally:
                if not self._lost:
                    transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            if self._lost:
                raise ConnectionResetError("connection lost")

    async def _socket_writable(self, fd: int) -> None:
        """Wait until ``fd`` (a duplicate of our socket) can take more bytes.

        The wait counts as the client not reading: the watchdog cuts a session that
        stays here past its timeout, as it does one stuck in drain().
        """
        if self._lost:
            raise ConnectionResetError("connection lost")
        waiter = self._loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_writer(fd, ready)
        self._drain_waiter = waiter
        self._write_paused = True
        try:
            await waiter
        finally:
            self._loop.remove_writer(fd)
            self._drain_waiter = None
            self._write_paused = False
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")

    def _progress(self) -> None:
        self._last_progress = self._loop.time()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self._last_progress = self._loop.time()

    # -- the event pump -------------------------------------------------------------

    def _pump(self) -> None:
        """Run the core until it needs bytes or an event needs I/O (then spawn a task)."""
        conn = self._conn
        assert conn is not None
        replied = False
        while self._task is None and not self._closing and self._upgrade is None:
            if self._write_paused:
                # The client is not reading: stop reading too, so pipelined commands
                # stay in the kernel's buffers rather than ours.
                self._pause_reading()
                return
            event = conn.next_event()
            output = conn.data_to_send()
            if output:
                self._write(output)
                replied = True
            if event is NEED_DATA:
                if replied:
                    self._arm_watchdog()
                self._resume_reading()
                return
            if event is FLUSH:
                continue  # the loop's top waits for the transport if it is full
            self._dispatch(conn, event)

    def _dispatch(self, conn: ServerConnection, event: Event) -> None:
        if isinstance(event, LoginRequest | ApopRequest):
            self._spawn(self._login(conn, event))
        elif isinstance(event, Retrieve):
            self._spawn(self._retrieve(conn, event))
        elif isinstance(event, Quit):
            self._spawn(self._quit(conn, event))
        elif isinstance(event, StartTls):
            self._upgrade = "discard"
            # The client's ClientHello must stay in the kernel for the TLS layer, not
            # reach data_received (which drops what comes before the switch).
            self._pause_reading()
            self._spawn(self._start_tls(conn))
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
        if self._lost:
            self._finish()
        elif not self._closing:
            self._pump()

    # -- the stages -----------------------------------------------------------------

    async def _login(self, conn: ServerConnection, event: LoginRequest | ApopRequest) -> None:
        hub = self._hub
        limits = hub.config.limits
        penalty = hub.penalty.delay(self._ip)
        if penalty > 0:
            # Before the check, so a penalised address costs no hashing either.
            await asyncio.sleep(penalty)
        outcome = await authenticate(
            hub.passdb,
            event,
            failure_delay=limits.auth_failure_delay,
            session_id=self._stats.session_id,
        )
        if outcome.user is None:
            if outcome.code == CODE_AUTH:
                hub.penalty.failed(self._ip)
            conn.login_failed(outcome.code, outcome.text)
            return
        hub.penalty.succeeded(self._ip)
        if self._user_slot is None:
            if not hub.claim_user(outcome.user):
                log.info(
                    "session=%s user=%s refused: max_sessions_per_user (%d) reached",
                    self._stats.session_id, outcome.user, limits.max_sessions_per_user,
                )
                conn.login_failed("IN-USE", TOO_MANY_USER_SESSIONS)
                return
            self._user_slot = outcome.user
        # The one crossing from the login world into the mail world: a verified name.
        try:
            maildrop = await self._hub.store.open_maildrop(outcome.user)
        except StoreError as exc:
            code, text = _store_failure(exc)
            log.log(
                logging.INFO if isinstance(exc, MaildropInUse) else logging.ERROR,
                "session=%s user=%s cannot open maildrop: %s",
                self._stats.session_id, outcome.user, exc,
                exc_info=None if isinstance(exc, MaildropInUse) else exc,
            )
            self._release_user_slot()
            conn.login_failed(code, text)
            return
        stage = TransactionStage(maildrop, self._stats, self._stats.session_id)
        if self._lost:
            await stage.release()  # the client left while we were looking
            return
        self._stage = stage
        self._stats.user = outcome.user
        self._leave_login_stage()
        conn.login_succeeded(maildrop.messages)
        # The timeout changes with the state; the watchdog takes the new one from now.
        self._cancel_watchdog()
        self._arm_watchdog()

    async def _retrieve(self, conn: ServerConnection, event: Retrieve) -> None:
        assert self._stage is not None
        await self._stage.retrieve(conn, event, self)

    async def _quit(self, conn: ServerConnection, event: Quit) -> None:
        assert self._stage is not None
        reply = await self._stage.quit(conn, event)
        self._write(reply)
        self._write(conn.data_to_send())
        self._close(EndReason.QUIT)

    async def _start_tls(self, conn: ServerConnection) -> None:
        context = self._hub.ssl_context
        assert context is not None
        raw = self._transport
        assert raw is not None
        # The +OK is in the raw transport's buffer; the TLS layer writes behind it.
        if self._write_paused:
            await self.drain()
        self._upgrade = "handshake"  # from here on only decrypted bytes reach us
        waiter: asyncio.Future[None] = self._loop.create_future()
        layer = TlsLayer(
            context,
            self._hub.config.limits.tls_handshake_timeout,
            on_ready=lambda _: _settle(waiter, None),
            on_failed=lambda exc: _settle(waiter, exc),
            app=self,
        )
        layer.take_over(raw)
        try:
            await waiter
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._upgrade = None
            self._close(EndReason.TLS_FAILED, abort=True, detail=str(exc) or type(exc).__name__)
            # The TLS layer reports a loss during the handshake to nobody: do it here.
            self.connection_lost(None)
            return
        except asyncio.CancelledError:
            layer.abort()
            raise
        self._transport = layer
        self._write_paused = False
        self._reading_paused = False
        layer.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._tls_ready()
        self._upgrade = None
        self._last_progress = self._loop.time()

    def _tls_ready(self) -> None:
        if not self._stats.tls:
            self._stats.tls = True
            assert self._conn is not None
            self._conn.tls_established()

    # -- timeouts -------------------------------------------------------------------

    def _timeout(self) -> float:
        limits = self._hub.config.limits
        if self._closing:
            # Only the last replies are left to deliver: no reason to wait as long as
            # for a logged-in user to think.
            return min(limits.login_timeout, limits.idle_timeout)
        if self._conn is not None and self._conn.state is SessionState.AUTHORIZATION:
            return limits.login_timeout
        return limits.idle_timeout

    def _arm_watchdog(self) -> None:
        self._last_progress = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._last_progress + self._timeout(), self._watchdog
            )

    def _cancel_watchdog(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _watchdog(self) -> None:
        self._timer = None
        if self._lost:
            return
        deadline = self._last_progress + self._timeout()
        # Time spent waiting on our own backends (hashing, the store) is not the
        # client's idleness; only a task waiting on the client's reading counts.
        waiting_on_us = self._task is not None and self._drain_waiter is None
        if waiting_on_us or deadline > self._loop.time():
            if waiting_on_us:
                deadline = self._loop.time() + self._timeout()
            self._timer = self._loop.call_at(deadline, self._watchdog)
            return
        if self._closing:
            # A graceful close waits for the client to read the last replies; one that
            # never does must not keep the connection (and its maildrop) forever.
            self._close(EndReason.TIMEOUT, abort=True)
        elif not self._write_paused and self._upgrade is None:
            self._write(IDLE_REPLY)
            self._close(EndReason.TIMEOUT)
        else:
            self._close(EndReason.TIMEOUT, abort=True)

    # -- ending ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server is stopping: say so between commands, drop mid-command."""
        if self._closing:
            return
        if self._task is None and not self._write_paused and self._upgrade is None:
            self._write(SHUTDOWN_REPLY)
            self._close(EndReason.SHUTDOWN)
        else:
            self._close(EndReason.SHUTDOWN, abort=True)

    def abort(self) -> None:
        """Drop the connection now (the maildrop is released without deleting)."""
        self._close(EndReason.SHUTDOWN, abort=True)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = False
            self._transport.resume_reading()

    def _close(self, reason: str, *, abort: bool = False, detail: str | None = None) -> None:
        if self._reason is None:
            self._reason = reason
            self._detail = detail
        self._closing = True
        self._close_file_socket()
        transport = self._transport
        if transport is None or self._lost:
            return
        if abort:
            self._cancel_watchdog()
            transport.abort()
        else:
            # A graceful close flushes queued replies and, under TLS, sends close_notify;
            # the watchdog stays armed in case the client never reads them.
            transport.close()
            self._arm_watchdog()

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

    def _release_user_slot(self) -> None:
        if self._user_slot is not None:
            self._hub.release_user(self._user_slot)
            self._user_slot = None

    def _log_end(self) -> None:
        self._release_user_slot()
        self._stats.log_end(self._reason or EndReason.DISCONNECT, self._detail)
        self._hub.ended(self)


def _settle(waiter: asyncio.Future[None], exc: BaseException | None) -> None:
    if not waiter.done():
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)


def _store_failure(exc: StoreError) -> tuple[str, str]:
    """The response code and text for a store that failed at login (RFC 3206)."""
    if isinstance(exc, MaildropInUse):
        return "IN-USE", "Maildrop is locked by another session."
    if isinstance(exc, PermanentStoreError):
        return "SYS/PERM", "Maildrop cannot be opened."
    return "SYS/TEMP", "Maildrop is temporarily unavailable, try again later."
