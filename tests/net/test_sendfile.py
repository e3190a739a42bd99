"""RETR of CRLF-stored mail by sendfile (net.zerocopy): the same bytes as the encoder,
in order with the other replies, under flow control and the idle timeout.

The first tests drive ``send_wire_file`` over a real loopback TCP connection with real
files; the rest run a real Pop3Service on a Maildir stored the way delivery stores it
(``save_crlf``), with raw clients that read slowly, pipeline, stop reading or vanish.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popbox.auth.memory import MemoryPassDB
from popbox.net import outlet as outlet_module
from popbox.net import zerocopy
from popbox.net.service import Pop3Service
from popbox.proto.wire import WireEncoder
from popbox.store.base import WireReadyFile
from popbox.store.maildir import MaildirStore
from support.pop3service import PASSWORD, Raw, make_config

# Bytes rich in what matters to the wire form: line ends, dots, bare CRs.
STORED_PIECES = st.lists(
    st.sampled_from([b"\r\n", b"\r", b".", b"..", b"a", b"\0", b"\xff", b".\r\n", b"\r\n\r\n"]),
    max_size=80,
).map(b"".join)


def encoded(stored: bytes) -> bytes:
    """What the encoder path sends for ``stored`` after the +OK line."""
    encoder = WireEncoder()
    return encoder.encode(stored) + encoder.finish()


@contextlib.asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    client.setblocking(False)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


async def wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    loop.add_writer(fd, lambda: waiter.done() or waiter.set_result(None))
    try:
        await waiter
    finally:
        loop.remove_writer(fd)


async def send_and_receive(
    stored: bytes, path: Path, *, sndbuf: int | None = None, read_delay: float = 0.0
) -> tuple[bytes, int]:
    """Send ``stored`` (as a file) with send_wire_file; return what arrived and the count."""
    path.write_bytes(stored)
    loop = asyncio.get_running_loop()
    with WireReadyFile(os.open(path, os.O_RDONLY), len(stored)) as file:
        async with tcp_pair() as (server, client):
            if sndbuf is not None:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            received = bytearray()

            async def read_all() -> None:
                while data := await loop.sock_recv(client, 65536):
                    received.extend(data)
                    if read_delay:
                        await asyncio.sleep(read_delay)

            reader = asyncio.create_task(read_all())
            sent = await zerocopy.send_wire_file(
                server, b"+OK\r\n", file, wait_writable, lambda: None
            )
            server.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(reader, 30)
    return bytes(received), sent


@pytest.mark.parametrize(
    "limits",
    [
        {},
        # Every run by sendfile and a handful of pieces per sendmsg.
        {"SENDFILE_MIN": 1, "MAX_IOV": 3},
        # Windows of a few octets: dotted lines and CR LF split across window ends,
        # with short windows gathered and longer ones sent as runs.
        {"READ_WINDOW": 5, "SENDFILE_MIN": 3, "MAX_IOV": 3},
        # Small windows, every piece gathered: a dot at a window's first octet.
        {"READ_WINDOW": 2},
    ],
    ids=["production", "tiny-runs", "tiny-windows", "gathered-windows"],
)
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=STORED_PIECES)
def test_sent_bytes_equal_the_encoders(
    stored: bytes, limits: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in limits.items():
        monkeypatch.setattr(zerocopy, name, value)
    received, sent = asyncio.run(send_and_receive(stored, tmp_path / "message"))
    body = encoded(stored)
    assert received == b"+OK\r\n" + body
    assert sent == len(body)


async def test_large_message_through_a_small_send_buffer_is_exact(tmp_path: Path) -> None:
    # 6 MB: long runs (sendfile), dense dotted lines (gathered sendmsg of >512
    # pieces), and a socket buffer far smaller than either, so every call is partial
    # or would block and the writability wait is exercised throughout.
    text = b"".join(b".line %d of text.\r\nplain line\r\n" % i for i in range(3000))
    base64ish = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 2 + b"\r\n") * 40_000
    stored = b"Subject: big\r\n\r\n" + text + base64ish + b"..\r\n" + base64ish + b"end"
    received, sent = await send_and_receive(
        stored, tmp_path / "big", sndbuf=8192, read_delay=0.0005
    )
    body = encoded(stored)
    assert len(received) == len(body) + 5
    assert received == b"+OK\r\n" + body
    assert sent == len(body)


async def test_a_file_shorter_than_announced_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100_000 + b"\r\n")
    with WireReadyFile(os.open(path, os.O_RDONLY), 100_002) as file:
        async with tcp_pair() as (server, _client):
            os.truncate(path, 40_000)  # cut short after the store looked
            with pytest.raises(OSError, match="early"):
                await zerocopy.send_wire_file(
                    server, b"+OK\r\n", file, wait_writable, lambda: None
                )


# -- through the server ---------------------------------------------------------------


MAILDROP = [
    b"Subject: one\n\nHello\n.leading dot\n..two dots\n.\nend\n",
    b"Subject: crlf\r\n\r\nline 1\r\n\r\n.\r\n",
    b".starts with a dot\nand \r bare CR\n",
    b"",
    b"Subject: open\n\nno final newline",
    b"Subject: big\n\n" + b"".join(b".%d\nQUJD\n" % i for i in range(20_000)) + b"Y" * 300_000
    + b"\n",
]
# What save_crlf stores, by index (the unterminated one is left to the encoder).
SENDFILE_INDEXES = [0, 1, 2, 3, 5]


def received_body(message: bytes) -> bytes:
    """The RETR body a client receives for a delivered ``message``, still stuffed."""
    return encoded(message)


@pytest.fixture
async def maildir_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Pop3Service]]]:
    services: list[Pop3Service] = []

    async def start(*, save_crlf: bool = True, **limits: Any) -> Pop3Service:
        store = MaildirStore(tmp_path / "mail", save_crlf=save_crlf)
        for message in MAILDROP:
            await store.deliver("alice", message)
        config = make_config(**limits)
        service = Pop3Service(config, store, MemoryPassDB({"alice": PASSWORD}), None)
        await service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        await service.shutdown()


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the files the session sent by the zero-copy path (the real function)."""
    calls: list[int] = []
    real = outlet_module.send_wire_file

    async def spy(sock: socket.socket, head: bytes, file: WireReadyFile, *args: Any) -> int:
        calls.append(file.size)
        return await real(sock, head, file, *args)

    monkeypatch.setattr(outlet_module, "send_wire_file", spy)
    return calls


async def login(service: Pop3Service, **kwargs: Any) -> Raw:
    kwargs.setdefault("limit", 1 << 24)  # the big message is one readuntil()
    client = await Raw.connect(service.plain_addresses[0], **kwargs)
    await client.login()
    return client


async def test_retr_of_crlf_stored_mail_is_exact_and_zero_copy(
    maildir_server: Callable[..., Awaitable[Pop3Service]],
    sendfile_calls: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = await maildir_server()
    client = await login(service)
    bodies = [await client.retr(n + 1) for n in range(len(MAILDROP))]
    assert bodies == [received_body(m) for m in MAILDROP]
    assert len(sendfile_calls) == len(SENDFILE_INDEXES)
    with caplog.at_level(logging.INFO, logger="popbox.pop3"):
        await client.send(b"QUIT\r\n")
        assert (await client.line()).startswith(b"+OK")
        await client.closed()
        client.close()
        while service.session_count:
            await asyncio.sleep(0.01)
    # The logout line counts what went out exactly as the encoder path counts it.
    total = sum(len(body) for body in bodies)
    assert any(f"retr={len(MAILDROP)}/{total}" in r.getMessage() for r in caplog.records)


async def test_tls_retr_of_crlf_stored_mail_is_exact_without_sendfile(
    tmp_path: Path,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    sendfile_calls: list[int],
) -> None:
    store = MaildirStore(tmp_path / "mail", save_crlf=True)
    for message in MAILDROP:
        await store.deliver("alice", message)
    service = Pop3Service(
        make_config(), store, MemoryPassDB({"alice": PASSWORD}), server_context
    )
    await service.start()
    try:
        client = await Raw.connect(
            service.tls_addresses[0],
            ssl=client_context,
            server_hostname="localhost",
            limit=1 << 24,
        )
        await client.login()
        bodies = [await client.retr(n + 1) for n in range(len(MAILDROP))]
        assert bodies == [received_body(m) for m in MAILDROP]
        # TLS needs the bytes in Python: the wire-ready files are read and stuffed.
        assert sendfile_calls == []
        client.close()
    finally:
        await service.shutdown()


async def test_lf_stored_mail_still_goes_through_the_encoder(
    maildir_server: Callable[..., Awaitable[Pop3Service]], sendfile_calls: list[int]
) -> None:
    service = await maildir_server(save_crlf=False)
    client = await login(service)
    bodies = [await client.retr(n + 1) for n in range(len(MAILDROP))]
    assert bodies == [received_body(m) for m in MAILDROP]
    # Only the messages without a bare LF are wire-ready as stored: the empty one and
    # the one delivered with CRLF.
    assert sorted(sendfile_calls) == sorted([0, len(MAILDROP[1])])
    client.close()


async def test_pipelined_commands_keep_their_order_around_sendfile(
    maildir_server: Callable[..., Awaitable[Pop3Service]], sendfile_calls: list[int]
) -> None:
    service = await maildir_server()
    client = await login(service)
    numbers = [6, 1, 2, 6, 3, 4, 5, 1]
    # Replies queued in the transport (STAT, LIST, NOOP) must leave before the file.
    await client.send(b"".join(b"STAT\r\nLIST\r\nRETR %d\r\nNOOP\r\n" % n for n in numbers))
    for number in numbers:
        assert (await client.line()).startswith(b"+OK")  # STAT
        listing = await asyncio.wait_for(client.reader.readuntil(b"\r\n.\r\n"), 10)
        assert listing.startswith(b"+OK")
        assert await client.retr_reply() == received_body(MAILDROP[number - 1])
        assert (await client.line()).startswith(b"+OK")  # NOOP
    assert len(sendfile_calls) == sum(1 for n in numbers if n - 1 in SENDFILE_INDEXES)
    client.close()


async def test_client_that_stops_reading_is_cut_at_the_idle_timeout(
    maildir_server: Callable[..., Awaitable[Pop3Service]], sendfile_calls: list[int]
) -> None:
    service = await maildir_server(idle_timeout=0.5)
    # A tiny receive window: the big message cannot fit in the socket buffers.
    client = await login(service)
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.writer.transport.pause_reading()
    await client.send(b"RETR 6\r\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    while service.session_count:
        assert loop.time() - started < 10, "a client that never reads pinned the session"
        await asyncio.sleep(0.05)
    assert sendfile_calls == [len(MAILDROP[5].replace(b"\n", b"\r\n"))]
    client.close()
    # Released, not committed: everything is still there for the next session.
    again = await login(service)
    await again.send(b"STAT\r\n")
    assert (await again.line()).startswith(b"+OK %d " % len(MAILDROP))
    again.close()


async def test_client_vanishing_mid_body_ends_the_session_and_keeps_the_mail(
    maildir_server: Callable[..., Awaitable[Pop3Service]], sendfile_calls: list[int]
) -> None:
    service = await maildir_server()
    client = await login(service)
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await client.send(b"DELE 1\r\nRETR 6\r\n")
    assert (await client.line()).startswith(b"+OK")
    await client.reader.readexactly(1000)
    # A reset rather than a FIN: the server's next send fails with ECONNRESET/EPIPE.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.writer.transport.abort()
    loop = asyncio.get_running_loop()
    started = loop.time()
    while service.session_count:
        assert loop.time() - started < 10
        await asyncio.sleep(0.02)
    assert sendfile_calls
    again = await login(service)
    await again.send(b"STAT\r\n")
    assert (await again.line()).startswith(b"+OK %d " % len(MAILDROP))
    again.close()


async def test_out_of_descriptors_for_the_duplicate_falls_back_to_streaming(
    maildir_server: Callable[..., Awaitable[Pop3Service]], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await maildir_server()

    def no_fd(*args: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    # Fault injection: the one dup() the zero-copy path needs fails, as at the fd limit.
    monkeypatch.setattr(outlet_module.socket, "fromfd", no_fd)
    client = await login(service)
    bodies = [await client.retr(n + 1) for n in range(len(MAILDROP))]
    assert bodies == [received_body(m) for m in MAILDROP]
    client.close()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("ending", ["quit", "reset"])
async def test_the_duplicate_socket_is_one_per_session_and_closes_with_it(
    maildir_server: Callable[..., Awaitable[Pop3Service]], sendfile_calls: list[int], ending: str
) -> None:
    service = await maildir_server()
    before = open_descriptors()
    client = await login(service)
    assert await client.retr(1) == received_body(MAILDROP[0])
    after_one = open_descriptors()
    for _ in range(3):
        for index in SENDFILE_INDEXES:
            assert await client.retr(index + 1) == received_body(MAILDROP[index])
    # Ten zero-copy RETRs later the session holds no more descriptors than after one.
    assert open_descriptors() == after_one
    assert len(sendfile_calls) == 1 + 3 * len(SENDFILE_INDEXES)
    if ending == "quit":
        await client.send(b"QUIT\r\n")
        assert (await client.line()).startswith(b"+OK")
        # The kept duplicate must not hold the TCP stream open after the server's close.
        await asyncio.wait_for(client.closed(), 5)
    else:
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.writer.transport.abort()
    client.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    while service.session_count or open_descriptors() > before:
        assert loop.time() - started < 10, "the session's descriptors were not all closed"
        await asyncio.sleep(0.02)


async def test_commands_sent_while_a_retr_is_sending_are_answered_after_it(
    maildir_server: Callable[..., Awaitable[Pop3Service]],
    sendfile_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[int] = []
    real_wait = outlet_module.TransportOutlet._socket_writable

    async def counted_wait(self: outlet_module.TransportOutlet, fd: int) -> None:
        waits.append(fd)
        await real_wait(self, fd)

    real_fromfd = socket.fromfd

    def small_send_buffer(*args: Any) -> socket.socket:
        # The duplicate is the session's socket: a small send buffer there makes the
        # server block mid-body at once, while the client still reads at full speed.
        duplicate = real_fromfd(*args)
        duplicate.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        return duplicate

    monkeypatch.setattr(outlet_module.TransportOutlet, "_socket_writable", counted_wait)
    monkeypatch.setattr(outlet_module.socket, "fromfd", small_send_buffer)
    service = await maildir_server()
    client = await login(service)
    client.writer.transport.pause_reading()
    await client.send(b"RETR 6\r\n")
    await asyncio.sleep(0.1)
    assert waits, "the body fitted in the socket buffers: nothing is tested"
    # The big body cannot fit in the socket buffers: the server is mid-send when the
    # next commands arrive, and must answer them only after the terminator.
    await client.send(b"NOOP\r\nRETR 1\r\nSTAT\r\n")
    await asyncio.sleep(0.1)
    client.writer.transport.resume_reading()
    assert (await client.line()).startswith(b"+OK")
    body = await asyncio.wait_for(client.reader.readuntil(b"\r\n.\r\n"), 30)
    assert body == received_body(MAILDROP[5])
    assert (await client.line()).startswith(b"+OK")  # NOOP
    assert await client.retr_reply() == received_body(MAILDROP[0])
    assert (await client.line()).startswith(b"+OK %d " % len(MAILDROP))
    assert len(sendfile_calls) == 2
    client.close()
