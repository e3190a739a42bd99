"""The collector's POP3 session: asyncio, TLS and timeouts around ``ClientConnection``.

Security first: implicit TLS by default, certificates verified against the system or
a configured CA (or pinned by SHA-256 fingerprint); with ``starttls`` a server that
does not offer STLS, refuses it or fails the handshake ends the session, never a
plaintext fallback; passwords never cross an unencrypted connection unless the account
says ``allow_plaintext_password``. Every read has a timeout. With PIPELINING, UIDL and
LIST go out together, several RETRs stay in flight and DELEs go out as one batch.
Bodies are written to a spool file as they arrive, hashed on the way. The protocol
core's errors become the collector's in one place, ``_collector_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import tempfile
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, ParamSpec

from scramp import ScramClient, ScramException

from popbox.collector.config import AccountSettings
from popbox.collector.tls import certificate_matches, client_tls_context
from popbox.collector.tokens import TokenProvider
from popbox.errors import CollectorError, ProtocolError, RemoteServerError
from popbox.proto.client import (
    Capabilities,
    ClientConnection,
    ConnectionClosed,
    Continuation,
    ErrReply,
    Event,
    Greeting,
    MessageData,
    MessageEnd,
    NeedData,
    OkReply,
    ScanListing,
    StatReply,
    UidListing,
)
from popbox.proto.replies import CODE_AUTH
from popbox.proto.sasl import (
    apop_digest,
    login_responses,
    oauthbearer_response,
    plain_response,
    xoauth2_response,
)

__all__ = ["Downloaded", "Pop3Session", "tls_context"]

# One read from the socket; matches the server side's streaming chunk.
READ_SIZE: Final = 256 * 1024
# Pipelined RETR/TOP go out again once a quarter of the window has come back.
REFILL_FRACTION: Final = 4
# Headers from TOP n 0 beyond this are cut: filters and header hashes need the start.
MAX_HEADER_BYTES: Final = 256 * 1024
# A body may exceed its LIST size a little (servers that count LF, not CRLF); twice
# the size plus 1 MiB still stops a server that streams without end.
SIZE_SLACK: Final = 1024 * 1024
# A SCRAM exchange's challenges: server-first, then server-final (RFC 5802 section 3).
_SCRAM_STEPS: Final = 2

_Args = ParamSpec("_Args")


def _collector_error(exc: ProtocolError | ValueError) -> CollectorError:
    """Where the protocol core's errors become the collector's: the one place.

    A server that broke the protocol or one of its bounds is a RemoteServerError like
    any other misbehaving server; an argument the core refuses to send (a line break in
    a username or password would smuggle a second command) is the account's error.
    """
    if isinstance(exc, ProtocolError):
        return RemoteServerError(str(exc))
    return CollectorError(str(exc))


@contextlib.contextmanager
def _collector_errors() -> Iterator[None]:
    """``_collector_error`` around a block (the per-event path uses it inline)."""
    try:
        yield
    except (ProtocolError, ValueError) as exc:
        raise _collector_error(exc) from exc


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A RETR that completed: the body (CRLF, un-dot-stuffed) in ``path``, or in
    ``data`` when it was small enough to keep in memory (``path`` is then not written).

    ``sha256`` is None for a body in ``data``: hashing releases the GIL, and on the
    event loop's thread getting it back waits behind the sinks' threads, so the
    consumer hashes such bodies in a worker thread (see ``with_digest``).
    """

    number: int
    path: Path
    size: int
    sha256: str | None
    data: bytes | None = None

    def with_digest(self) -> Downloaded:
        if self.sha256 is not None or self.data is None:
            return self
        return Downloaded(
            self.number, self.path, self.size, hashlib.sha256(self.data).hexdigest(), self.data
        )

    @property
    def digest(self) -> str:
        """The SHA-256 (hex); only for a Downloaded that went through ``with_digest``."""
        if self.sha256 is None:
            raise ValueError("body not hashed yet")
        return self.sha256


def tls_context(account: AccountSettings) -> ssl.SSLContext:
    """Verifying TLS context for the account; fingerprint pinning replaces the CA check."""
    return client_tls_context(account.ca_file, account.tls_fingerprint)


class Pop3Session:
    """One connection to one account's server."""

    def __init__(
        self,
        account: AccountSettings,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.account = account
        self._reader = reader
        self._writer = writer
        self._conn = ClientConnection()
        self._timeout = account.command_timeout
        self.tls_active = False
        self.greeting: Greeting | None = None
        self.capabilities = Capabilities({})

    # ---------------------------------------------------------------- opening

    @classmethod
    async def open(cls, account: AccountSettings) -> Pop3Session:
        """Connect, read the greeting, secure the connection and read CAPA."""
        context = tls_context(account) if account.security != "none" else None
        server_name = account.tls_server_name or account.host
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    account.host,
                    account.effective_port,
                    ssl=context if account.security == "tls" else None,
                    server_hostname=server_name if account.security == "tls" else None,
                ),
                account.connect_timeout,
            )
        except ssl.SSLError as exc:
            raise RemoteServerError(f"TLS with {account.host}: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise RemoteServerError(f"cannot connect to {account.host}: {exc}") from exc
        session = cls(account, reader, writer)
        try:
            if account.security == "tls":
                session.tls_active = True
                session._check_fingerprint()
            event = await session._event()
            if isinstance(event, ErrReply):
                raise RemoteServerError(f"server refused us: {event.text}", code=event.code)
            if not isinstance(event, Greeting):
                raise RemoteServerError("no greeting")
            session.greeting = event
            await session._read_capabilities()
            if account.security == "starttls":
                assert context is not None
                await session._start_tls(context, server_name)
        except BaseException:
            await session.close()
            raise
        return session

    def _check_fingerprint(self) -> None:
        expected = self.account.tls_fingerprint
        if expected is None:
            return
        ssl_object = self._writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not certificate_matches(der, expected):
            raise RemoteServerError("server certificate does not match tls_fingerprint")

    async def _read_capabilities(self) -> None:
        self._send(self._conn.capa())
        event = await self._event()
        # RFC 2449 servers answer CAPA; RFC 1939-only servers say -ERR, which is fine.
        self.capabilities = event if isinstance(event, Capabilities) else Capabilities({})

    async def _start_tls(self, context: ssl.SSLContext, server_name: str) -> None:
        if "STLS" not in self.capabilities:
            raise RemoteServerError("server does not offer STLS; not falling back to plaintext")
        self._send(self._conn.stls())
        event = await self._event()
        if not isinstance(event, OkReply):
            raise RemoteServerError("server refused STLS; not falling back to plaintext")
        with _collector_errors():
            self._conn.start_tls()
        try:
            await asyncio.wait_for(
                self._writer.start_tls(context, server_hostname=server_name),
                self.account.connect_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            raise RemoteServerError(f"STLS handshake with {self.account.host}: {exc}") from exc
        self.tls_active = True
        self._check_fingerprint()
        # RFC 2595 section 4: forget what was learnt before TLS and ask again.
        await self._read_capabilities()

    # ---------------------------------------------------------------- I/O

    def _send(self, data: bytes) -> None:
        self._writer.write(data)

    async def _event(self) -> Event:
        while True:
            try:
                event = self._conn.next_event()
            except (ProtocolError, ValueError) as exc:
                raise _collector_error(exc) from exc
            if not isinstance(event, NeedData):
                if isinstance(event, ConnectionClosed):
                    raise RemoteServerError("server closed the connection")
                return event
            try:
                await self._writer.drain()
                data = await asyncio.wait_for(self._reader.read(READ_SIZE), self._timeout)
            except TimeoutError as exc:
                raise RemoteServerError(f"no answer within {self._timeout:g}s") from exc
            except (OSError, ssl.SSLError) as exc:
                raise RemoteServerError(f"connection lost: {exc}") from exc
            self._conn.receive_data(data)

    async def _simple(
        self, command: Callable[_Args, bytes], *args: _Args.args, **kwargs: _Args.kwargs
    ) -> OkReply:
        """Send ``command(*args)`` of the connection, then expect ``+OK``."""
        with _collector_errors():
            data = command(*args, **kwargs)
        self._send(data)
        event = await self._event()
        if isinstance(event, ErrReply):
            raise RemoteServerError(f"{event.command}: {event.text}", code=event.code)
        if not isinstance(event, OkReply):
            raise RemoteServerError(f"unexpected reply {type(event).__name__}")
        return event

    @property
    def pipelining(self) -> bool:
        mode = self.account.pipelining
        return mode == "on" or (mode == "auto" and "PIPELINING" in self.capabilities)

    @property
    def window(self) -> int:
        return self.account.max_in_flight if self.pipelining else 1

    # ---------------------------------------------------------------- login

    async def login_password(self, password: str) -> None:
        mechanism = self.account.auth_mechanism
        if mechanism.startswith("scram-"):
            # SCRAM proves the password without sending it: no TLS needed for that.
            await self._scram(mechanism.upper(), self.account.username, password)
            return
        if not self.tls_active and not self.account.allow_plaintext_password:
            raise CollectorError(f"{self.account.name}: refusing to send a password without TLS")
        if mechanism == "auto":
            mechanism = "plain" if "PLAIN" in self.capabilities.sasl_mechanisms() else "user"
        username = self.account.username
        if mechanism == "apop":
            if self.greeting is None or self.greeting.apop_timestamp is None:
                raise RemoteServerError("APOP asked for but the greeting has no timestamp")
            digest = apop_digest(self.greeting.apop_timestamp, password)
            await self._simple(self._conn.apop, username, digest)
        elif mechanism == "user":
            await self._simple(self._conn.user, username)
            await self._simple(self._conn.pass_, password)
        elif mechanism == "plain":
            await self._sasl("PLAIN", [plain_response(username, password)], inline_ok=True)
        else:
            await self._sasl("LOGIN", list(login_responses(username, password)), inline_ok=False)

    async def _scram(self, base: str, username: str, password: str) -> None:
        """SCRAM (RFC 5802, RFC 7677) on scramp's client: ``base``-PLUS, bound to the
        server's certificate (tls-server-end-point), when the server offers it inside
        TLS; otherwise ``base``, telling a TLS server we could bind (``y``) so that one
        whose -PLUS was stripped from CAPA refuses. The login counts only once the
        server's signature proves it holds the keys too."""
        offered = self.capabilities.sasl_mechanisms()
        tls = self._writer.get_extra_info("ssl_object") if self.tls_active else None
        name = f"{base}-PLUS" if tls is not None and f"{base}-PLUS" in offered else base
        if offered and name not in offered:
            raise RemoteServerError(f"the server does not offer {base}", code=CODE_AUTH)
        binding = ("tls-server-end-point", tls) if tls is not None else None
        try:
            scram = ScramClient([name], username, password, channel_binding=binding)
            first = scram.get_client_first().encode()
        except ScramException as exc:
            raise CollectorError(f"{self.account.name}: cannot start {name}: {exc}") from exc
        self._send(self._conn.auth(name, first))
        sent_first = self._conn.auth_fits_inline(name, first)
        steps = 0
        while True:
            event = await self._event()
            if isinstance(event, OkReply):
                if steps < _SCRAM_STEPS:
                    raise RemoteServerError(f"{name}: logged in without the server's signature")
                return
            if isinstance(event, ErrReply):
                raise RemoteServerError(
                    f"AUTH {name} refused: {event.text}", code=event.code or CODE_AUTH
                )
            if not isinstance(event, Continuation):
                raise RemoteServerError(f"unexpected reply to AUTH: {type(event).__name__}")
            if not sent_first:
                sent_first = True
                self._send(self._conn.sasl_response(first))
                continue
            steps += 1
            try:
                if steps == 1:
                    scram.set_server_first(event.data.decode("utf-8"))
                    answer = scram.get_client_final().encode()
                elif steps == _SCRAM_STEPS:
                    scram.set_server_final(event.data.decode("utf-8"))
                    answer = b""  # RFC 5034 section 4: the server-final was a challenge
                else:
                    raise ScramException("a challenge after the server-final message")
            except (ScramException, UnicodeDecodeError) as exc:
                self._send(self._conn.sasl_cancel())
                await self._event()  # the -ERR that answers the cancel
                raise RemoteServerError(f"{name}: the server failed SCRAM: {exc}") from exc
            self._send(self._conn.sasl_response(answer))

    async def login_oauth(self, tokens: TokenProvider) -> None:
        mechanisms = self.capabilities.sasl_mechanisms()
        mechanism = self.account.auth_mechanism
        if mechanism == "auto":
            # Microsoft 365 and Gmail speak XOAUTH2; OAUTHBEARER is the RFC 7628 form.
            mechanism = (
                "oauthbearer"
                if "OAUTHBEARER" in mechanisms and "XOAUTH2" not in mechanisms
                else "xoauth2"
            )
        failure: RemoteServerError | None = None
        for force_refresh in (False, True):
            token = await tokens.token(force_refresh=force_refresh)
            if mechanism == "xoauth2":
                response = xoauth2_response(self.account.username, token)
            else:
                response = oauthbearer_response(
                    self.account.username, token, self.account.host, self.account.effective_port
                )
            try:
                # Two-step (AUTH, wait for "+", token): the form Microsoft requires.
                await self._sasl(mechanism.upper(), [response], inline_ok=False)
                return
            except RemoteServerError as exc:
                # An expired token is refused once; a fresh one gets one more try.
                if exc.code not in (None, CODE_AUTH):
                    raise
                failure = exc
        assert failure is not None
        raise failure

    async def _sasl(self, mechanism: str, responses: list[bytes], *, inline_ok: bool) -> None:
        queue = deque(responses)
        if inline_ok and queue and self._conn.auth_fits_inline(mechanism, queue[0]):
            self._send(self._conn.auth(mechanism, queue.popleft()))
        else:
            self._send(self._conn.auth(mechanism))
        while True:
            event = await self._event()
            if isinstance(event, Continuation):
                # Out of answers: this is an error challenge; an empty line ends it.
                self._send(self._conn.sasl_response(queue.popleft() if queue else b""))
            elif isinstance(event, OkReply):
                return
            elif isinstance(event, ErrReply):
                raise RemoteServerError(
                    f"AUTH {mechanism} refused: {event.text}", code=event.code or CODE_AUTH
                )
            else:
                raise RemoteServerError(f"unexpected reply to AUTH: {type(event).__name__}")

    # ---------------------------------------------------------------- transaction

    async def listing(self) -> tuple[dict[int, int], UidListing | None]:
        """Sizes by message number, and the UIDL listing (None without UIDL)."""
        if self.pipelining:
            self._send(self._conn.list_all() + self._conn.uidl_all())
            scan, uids = await self._event(), await self._event()
        else:
            self._send(self._conn.list_all())
            scan = await self._event()
            self._send(self._conn.uidl_all())
            uids = await self._event()
        if isinstance(scan, ErrReply):
            raise RemoteServerError(f"LIST: {scan.text}", code=scan.code)
        if not isinstance(scan, ScanListing):
            raise RemoteServerError("unexpected reply to LIST")
        sizes = dict(scan.entries)
        if isinstance(uids, UidListing):
            if {number for number, _ in uids.entries} != set(sizes):
                return sizes, UidListing(uids.entries, (*uids.problems, "UIDL != LIST"))
            return sizes, uids
        return sizes, None

    async def stat(self) -> StatReply:
        self._send(self._conn.stat())
        event = await self._event()
        if not isinstance(event, StatReply):
            raise RemoteServerError("STAT failed")
        return event

    async def headers(self, numbers: Iterable[int]) -> AsyncGenerator[tuple[int, bytes], None]:
        """``TOP n 0`` for each number (pipelined): the header section of each."""
        async for number, data in self._bodies(numbers, top=True):
            if isinstance(data, bytes):
                yield number, data

    async def retrieve(
        self, numbers: Iterable[int], sizes: dict[int, int], spool: Path, *, keep_below: int = 0
    ) -> AsyncGenerator[Downloaded | tuple[int, ErrReply], None]:
        """RETR each number with up to ``window`` in flight; bodies go to ``spool``, or
        stay in memory when LIST gave them fewer than ``keep_below`` octets."""
        self._sizes = sizes
        self._spool = spool
        self._keep_below = keep_below
        async for number, data in self._bodies(numbers, top=False):
            if isinstance(data, Downloaded | ErrReply):
                yield data if isinstance(data, Downloaded) else (number, data)

    async def _bodies(
        self, numbers: Iterable[int], *, top: bool
    ) -> AsyncGenerator[tuple[int, bytes | Downloaded | ErrReply], None]:
        todo = iter(numbers)
        in_flight: deque[int] = deque()
        window = self.window
        # Refill in groups, one write (one segment) for several commands, not one each.
        refill_at = max(1, window // REFILL_FRACTION)

        def send_more() -> None:
            if window - len(in_flight) < refill_at and in_flight:
                return
            commands: list[bytes] = []
            while len(in_flight) < window:
                number = next(todo, None)
                if number is None:
                    break
                commands.append(self._conn.top(number, 0) if top else self._conn.retr(number))
                in_flight.append(number)
            if commands:
                self._send(b"".join(commands))

        send_more()
        try:
            while in_flight:
                number = in_flight.popleft()
                event = await self._event()
                if isinstance(event, ErrReply):
                    send_more()
                    yield number, event
                    continue
                if not isinstance(event, OkReply):
                    raise RemoteServerError("unexpected reply to RETR/TOP")
                result = await (self._read_headers() if top else self._read_to_spool(number))
                # Ask for the next one before handing this one over, so the server
                # streams while the sinks work.
                send_more()
                yield number, result
        finally:
            # Stopped early (SIGTERM, an error): what is still in flight is read and
            # dropped by finish_pending() before the next command, so replies line up.
            in_flight.clear()

    async def _read_headers(self) -> bytes:
        parts: list[bytes] = []
        kept = 0
        while True:
            event = await self._event()
            if isinstance(event, MessageEnd):
                return b"".join(parts)
            if isinstance(event, MessageData) and kept < MAX_HEADER_BYTES:
                piece = event.data[: MAX_HEADER_BYTES - kept]
                parts.append(piece)
                kept += len(piece)

    async def _read_body(self, number: int, listed: int, consume: Callable[[bytes], object]) -> int:
        """Hand each piece of a RETR body to ``consume``; return its size.

        A body that runs far past its LIST size is a broken or hostile server.
        """
        limit = max(listed * 2, listed + SIZE_SLACK)
        size = 0
        while True:
            event = await self._event()
            if isinstance(event, MessageEnd):
                return size
            if isinstance(event, MessageData):
                size += len(event.data)
                if size > limit:
                    raise RemoteServerError(
                        f"message {number} runs past {limit} octets (LIST said {listed})"
                    )
                consume(event.data)

    async def _read_to_memory(self, number: int, listed: int) -> Downloaded:
        parts: list[bytes] = []
        size = await self._read_body(number, listed, parts.append)
        path = self._spool / f"mem-{os.getpid()}-{number}"
        return Downloaded(number, path, size, None, b"".join(parts))

    async def _read_to_spool(self, number: int) -> Downloaded:
        listed = self._sizes.get(number, 0)
        if listed < self._keep_below:
            return await self._read_to_memory(number, listed)
        digest = hashlib.sha256()
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - handed over as a path
            dir=self._spool, prefix="retr-", delete=False
        )
        path = Path(handle.name)

        def consume(data: bytes) -> None:
            digest.update(data)
            handle.write(data)

        try:
            with handle:
                size = await self._read_body(number, listed, consume)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return Downloaded(number, path, size, digest.hexdigest())

    async def finish_pending(self) -> None:
        """Read and drop replies still in flight (after an early stop)."""
        while self._conn.busy:
            await self._event()

    async def delete(self, numbers: Iterable[int]) -> None:
        """DELE each number, as one pipelined batch when the server allows it."""
        numbers = list(numbers)
        for start in range(0, len(numbers), self.window if self.pipelining else 1):
            batch = numbers[start : start + (self.window if self.pipelining else 1)]
            self._send(b"".join(self._conn.dele(number) for number in batch))
            for _ in batch:
                event = await self._event()
                if isinstance(event, ErrReply):
                    raise RemoteServerError(f"DELE: {event.text}", code=event.code)

    async def quit(self) -> None:
        """QUIT; the server commits deletions before its +OK (RFC 1939 UPDATE state)."""
        await self.finish_pending()
        await self._simple(self._conn.quit)
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 5)

    _sizes: dict[int, int]
    _spool: Path
    _keep_below: int = 0
