"""RETR over TLS of CRLF-stored mail (the wire-ready path through ``TlsLayer``): the
bytes are exact whatever the dots and the piece boundaries, records are full, a client
that stops reading is cut at the idle timeout without the message piling up in the
server, and a TLS error after the handshake names itself in the session's log line.

The server is a real Pop3Service on a Maildir stored as delivery stores it
(``save_crlf``); the clients are asyncio TLS streams or a TLS client over memory BIOs
that sees every record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from popbox.auth.memory import MemoryPassDB
from popbox.net import transaction
from popbox.net.service import Pop3Service
from popbox.net.tls import TLS_RECORD_PLAINTEXT
from popbox.proto.wire import WireEncoder
from popbox.store.maildir import MaildirStore
from support.pop3service import PASSWORD, Raw, make_config

BATCH = transaction.WRITE_BATCH

# Lines that matter to dot-stuffing, stored CRLF as delivery stores them.
LINE = st.sampled_from(
    [b".", b"..", b".x", b"a.b", b"", b"text", b"\r", b"x" * 5000, b". .", b"\xff."]
)


def encoded(stored: bytes) -> bytes:
    """What the encoder path sends for ``stored`` after the +OK line."""
    encoder = WireEncoder()
    return encoder.encode(stored) + encoder.finish()


@st.composite
def crlf_messages(draw: st.DrawFn) -> bytes:
    """A CRLF-stored message, sometimes padded so a dotted line starts right at, just
    before or just after a read batch's edge (or a TLS record's)."""
    lines = draw(st.lists(LINE, max_size=30))
    body = b"".join(line + b"\r\n" for line in lines)
    if draw(st.booleans()):
        edge = draw(st.sampled_from([BATCH, 2 * BATCH, TLS_RECORD_PLAINTEXT]))
        shift = draw(st.integers(min_value=-3, max_value=2))
        head = b"Subject: pad\r\n\r\n"
        filler = edge + shift - len(head) - 2
        if filler > 0:
            body = head + b"y" * filler + b"\r\n" + body
    return body


@pytest.fixture
async def tls_maildir(
    tmp_path: Path, server_context: ssl.SSLContext
) -> AsyncIterator[Callable[..., Awaitable[Pop3Service]]]:
    services: list[Pop3Service] = []

    async def start(messages: list[bytes], **limits: Any) -> Pop3Service:
        root = tmp_path / f"mail{len(services)}"
        store = MaildirStore(root, save_crlf=True)
        for message in messages:
            await store.deliver("alice", message)
        service = Pop3Service(
            make_config(**limits), store, MemoryPassDB({"alice": PASSWORD}), server_context
        )
        await service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        await service.shutdown()


async def tls_login(service: Pop3Service, context: ssl.SSLContext) -> Raw:
    client = await Raw.connect(
        service.tls_addresses[0], ssl=context, server_hostname="localhost", limit=1 << 25
    )
    await client.login()
    return client


async def retr_all_over_tls(
    messages: list[bytes], root: Path, server: ssl.SSLContext, client: ssl.SSLContext
) -> list[bytes]:
    store = MaildirStore(root, save_crlf=True)
    for message in messages:
        await store.deliver("alice", message)
    service = Pop3Service(make_config(), store, MemoryPassDB({"alice": PASSWORD}), server)
    await service.start()
    try:
        raw = await tls_login(service, client)
        bodies = [await raw.retr(n + 1) for n in range(len(messages))]
        raw.close()
        return bodies
    finally:
        await service.shutdown()


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(crlf_messages(), min_size=1, max_size=4))
@example(messages=[
    b"",
    b".\r\n",
    b"x" * (BATCH - 2) + b"\r\n.dot opens the second batch\r\n",
    b"".join(b"." + b"d" * (TLS_RECORD_PLAINTEXT - 3) + b"\r\n" for _ in range(40)),
])
def test_tls_retr_is_byte_exact(
    messages: list[bytes],
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    tmp_path: Path,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        bodies = runner.run(retr_all_over_tls(messages, root, server_context, client_context))
    assert bodies == [encoded(m) for m in messages]


async def test_big_message_through_a_small_send_buffer_is_exact(
    tls_maildir: Callable[..., Awaitable[Pop3Service]], client_context: ssl.SSLContext
) -> None:
    """3 MB, dotted text and base64-like runs, through an 8 KiB server send buffer to a
    client that reads a little at a time: nearly every write meets a full socket, so
    the rest waits in the transport and the stage in flow control."""
    text = b"".join(b".line %d of text.\r\nplain line\r\n" % i for i in range(3000))
    base64ish = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 2 + b"\r\n") * 20_000
    stored = b"Subject: big\r\n\r\n" + text + base64ish + b"..\r\n" + base64ish + b".end\r\n"
    service = await tls_maildir([stored])
    client = await tls_login(service, client_context)
    hub = service._hub
    assert hub is not None
    (session,) = hub.sessions
    assert session.transport is not None
    server_socket = session.transport.get_extra_info("socket")
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    await client.send(b"RETR 1\r\n")
    assert (await client.line()).startswith(b"+OK")
    parts = []
    tail = b""
    while not tail.endswith(b"\r\n.\r\n"):
        part = await asyncio.wait_for(client.reader.read(20_000), 10)
        assert part
        parts.append(part)
        tail = (tail + part)[-5:]
        await asyncio.sleep(0.0002)
    assert b"".join(parts) == encoded(stored)
    client.close()


async def test_client_that_stops_reading_is_cut_without_the_message_piling_up(
    tls_maildir: Callable[..., Awaitable[Pop3Service]], client_context: ssl.SSLContext
) -> None:
    """The session waits on flow control with at most a batch or two in the server's
    buffers (not the 20 MB message), and the idle timeout ends it; nothing is deleted."""
    stored = b"Subject: big\r\n\r\n" + b".QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo\r\n" * 560_000
    service = await tls_maildir([stored], idle_timeout=0.5)
    client = await tls_login(service, client_context)
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.writer.transport.pause_reading()
    await client.send(b"RETR 1\r\n")
    hub = service._hub
    assert hub is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    buffered = 0
    while service.session_count:
        assert loop.time() - started < 10, "a client that never reads pinned the session"
        for session in hub.sessions:
            transport = session.transport
            if transport is not None:
                buffered = max(buffered, transport.get_write_buffer_size())
        await asyncio.sleep(0.02)
    assert 0 < buffered <= 4 * BATCH
    client.close()
    again = await tls_login(service, client_context)
    await again.send(b"STAT\r\n")
    assert (await again.line()).startswith(b"+OK 1 ")
    again.close()


class BioClient:
    """A TLS client over memory BIOs on a plain socket: it sees every record."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.records: list[tuple[int, int]] = []  # (content type, length) as on the wire
        self._raw = b""

    def _pump_out(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _receive(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError
        self._raw += data
        while len(self._raw) >= 5:
            kind, _, length = struct.unpack("!BHH", self._raw[:5])
            if len(self._raw) < 5 + length:
                break
            self.records.append((kind, length))
            self._raw = self._raw[5 + length :]
        self.incoming.write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._pump_out()
                return
            except ssl.SSLWantReadError:
                self._pump_out()
                self._receive()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._pump_out()

    def read_until(self, end: bytes) -> bytes:
        data = b""
        while not data.endswith(end):
            try:
                data += self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                self._receive()
        return data


async def test_retr_goes_out_in_full_records(
    tls_maildir: Callable[..., Awaitable[Pop3Service]], client_context: ssl.SSLContext
) -> None:
    """The +OK line rides in the body's first record and the terminator in its last:
    a RETR of n octets (status line and terminator included) takes ceil(n / 16 KiB)
    application-data records, plus one per write batch at most."""
    stored = b"Subject: dots\r\n\r\n" + b"".join(b".%d\r\nline\r\n" % i for i in range(60_000))
    service = await tls_maildir([stored, b"short\r\n"])

    def session() -> list[tuple[bytes, int]]:
        results = []
        with socket.create_connection(service.tls_addresses[0], timeout=10) as sock:
            client = BioClient(sock, client_context)
            client.handshake()
            assert client.read_until(b"\r\n").startswith(b"+OK")
            client.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
            client.read_until(b"\r\n")
            client.read_until(b"\r\n")
            for number in (1, 2):
                before = len(client.records)
                client.send(b"RETR %d\r\n" % number)
                reply = client.read_until(b"\r\n.\r\n")
                results.append((reply, len(client.records) - before))
        return results

    (big, big_records), (small, small_records) = await asyncio.to_thread(session)
    assert big.split(b"\r\n", 1)[1] == encoded(stored)
    assert small.split(b"\r\n", 1)[1] == encoded(b"short\r\n")
    assert small_records == 1
    full = -(-len(big) // TLS_RECORD_PLAINTEXT)
    assert full <= big_records <= full + -(-len(big) // BATCH)


async def test_tls_error_after_the_handshake_is_the_logged_reason(
    tls_maildir: Callable[..., Awaitable[Pop3Service]],
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A record that fails to decrypt ends the session; the log line says it was TLS
    and why, not just "disconnect"."""
    service = await tls_maildir([b"x\r\n"])
    caplog.set_level(logging.INFO, logger="popbox.pop3")

    def session() -> None:
        raw = socket.create_connection(service.tls_addresses[0], timeout=10)
        tls = client_context.wrap_socket(raw, server_hostname="localhost")
        with tls:
            tls.recv(1000)
            tls.sendall(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
            received = b""
            while received.count(b"\r\n") < 2:
                received += tls.recv(1000)
            # An application-data record the server cannot decrypt, on the same socket.
            with socket.socket(fileno=os.dup(tls.fileno())) as same:
                same.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))
            try:
                while tls.recv(1000):
                    pass
            except (ssl.SSLError, OSError):
                pass

    await asyncio.to_thread(session)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while service.session_count:
        assert loop.time() - started < 10
        await asyncio.sleep(0.02)
    (line,) = [r.getMessage() for r in caplog.records if "reason=" in r.getMessage()]
    assert "user=alice" in line
    assert "reason=tls-error" in line
    assert "detail='[SSL: " in line
