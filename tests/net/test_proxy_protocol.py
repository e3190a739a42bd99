"""PROXY protocol v1/v2 in front of the plain, implicit-TLS and LMTP listeners (HAProxy's
setup): headers from the trusted balancer only, and only on the listeners named."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator

import pytest

from popbox.delivery.deliverer import Deliverer
from popbox.delivery.lmtp import LmtpService
from popbox.net.proxy import (
    PROXY_V2_SIGNATURE,
    ProxyAddress,
    ProxyHeaderError,
    parse_v1,
    parse_v2,
)
from popbox.store.memory import MemoryStore
from support.lmtp import make_config as lmtp_config
from support.lmtp import users as lmtp_users
from support.pop3service import PASSWORD, Connect, StartServer, until_no_sessions


def v2(source: str, port: int, *, command: int = 0x21, tlv: bytes = b"") -> bytes:
    address = ipaddress.ip_address(source)
    if address.version == 4:
        family, body = 0x11, address.packed + bytes(4) + struct.pack("!HH", port, 110)
    else:
        family, body = 0x21, address.packed + bytes(16) + struct.pack("!HH", port, 110)
    body += tlv
    return PROXY_V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def test_v1_lines() -> None:
    assert parse_v1(b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 110\r\n") == ProxyAddress(
        "192.0.2.7", 5555
    )
    assert parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 110\r\n") == ProxyAddress(
        "2001:db8::7", 5555
    )
    assert parse_v1(b"PROXY UNKNOWN\r\n") is None
    for bad in (
        b"PROXY TCP4 192.0.2.7 10.0.0.1 5555\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 5555 110\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 05555 110\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 70000 110\r\n",
        b"PROXY TCP4 192.0.2.777 10.0.0.1 5555 110\r\n",
        b"PROXY UDP4 192.0.2.7 10.0.0.1 5555 110\r\n",
    ):
        with pytest.raises(ProxyHeaderError):
            parse_v1(bad)


def test_v2_headers() -> None:
    header = v2("192.0.2.7", 5555, tlv=b"\x01\x00\x02h2")
    assert parse_v2(header[:16], header[16:]) == ProxyAddress("192.0.2.7", 5555)
    mapped = v2("::ffff:192.0.2.8", 6666)
    assert parse_v2(mapped[:16], mapped[16:]) == ProxyAddress("192.0.2.8", 6666)
    local = v2("192.0.2.7", 5555, command=0x20)
    assert parse_v2(local[:16], local[16:]) is None
    with pytest.raises(ProxyHeaderError):
        parse_v2(b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c", bytes(12))


@pytest.mark.parametrize("header", ["v1", "v2"])
async def test_plain_listener_takes_the_address_from_the_header(
    connect: Connect,
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    header: str,
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    server = await start_server(proxy_protocol=True)
    client = await connect(server.plain)
    data = (
        b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 110\r\n" if header == "v1" else v2("192.0.2.7", 5555)
    )
    # Header and first command in one write: the command must survive intact.
    await client.send(data + b"CAPA\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK")
    capabilities = await client.multiline()
    # 192.0.2.7 is not loopback: with the default "loopback" policy, no plaintext login.
    assert b"USER" not in capabilities.split(b"\r\n")
    assert b"STLS" in capabilities.split(b"\r\n")
    await client.send(b"QUIT\r\n")
    await client.closed()
    await until_no_sessions(server)
    (line,) = [r.getMessage() for r in caplog.records if "reason=" in r.getMessage()]
    assert "peer=192.0.2.7:5555" in line


async def test_connection_without_header_is_dropped(
    connect: Connect, start_server: StartServer
) -> None:
    server = await start_server(proxy_protocol=True)
    client = await connect(server.plain)
    await client.send(b"USER alice\r\nPASS x\r\nQUIT\r\n")
    # Nothing is answered; unread input makes the kernel reset rather than close.
    with contextlib.suppress(ConnectionResetError):
        assert await client.closed() == b""


async def test_missing_header_times_out(connect: Connect, start_server: StartServer) -> None:
    server = await start_server(proxy_protocol=True, login_timeout=0.3)
    client = await connect(server.plain)
    assert await client.closed(timeout=3) == b""


async def test_cap_counts_the_proxied_address(
    connect: Connect, start_server: StartServer
) -> None:
    server = await start_server(proxy_protocol=True, max_connections_per_ip=1)
    first = await connect(server.plain)
    await first.send(v2("192.0.2.7", 1))
    assert (await first.line()).startswith(b"+OK")
    other = await connect(server.plain)
    await other.send(v2("192.0.2.8", 2))
    assert (await other.line()).startswith(b"+OK")
    same = await connect(server.plain)
    await same.send(v2("192.0.2.7", 3))
    assert b"too many connections" in await same.closed()


async def test_implicit_tls_after_header_in_the_same_segment(
    start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    """The ClientHello follows the header in one write; not a byte of it may be lost."""
    server = await start_server(proxy_protocol=True)

    def session() -> bytes:
        with socket.create_connection(server.tls, timeout=10) as raw:
            return over_tls(raw)

    def over_tls(raw: socket.socket) -> bytes:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        raw.sendall(v2("::1", 7777) + outgoing.read())
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        raw.sendall(outgoing.read())
        tls.write(f"USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode())
        raw.sendall(outgoing.read())
        received = b""
        while received.count(b"\r\n") < 5:
            try:
                received += tls.read(65536)
            except ssl.SSLWantReadError:
                chunk = raw.recv(65536)
                if not chunk:
                    break
                incoming.write(chunk)
        return received

    lines = (await asyncio.to_thread(session)).split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    assert lines[3].startswith(b"+OK 3 ")


async def test_allow_nets_sees_the_client_and_allow_real_nets_the_proxy(
    connect: Connect, start_server: StartServer
) -> None:
    # Behind HAProxy (on 127.0.0.1 here) a client at 192.0.2.7: allow_nets is checked
    # against the client, allow_real_nets against the proxy, as Dovecot does.
    server = await start_server(
        proxy_protocol=True,
        plaintext_auth="always",
        users={
            "lan": {"allow_nets": "127.0.0.0/8"},
            "via_proxy": {"allow_real_nets": "127.0.0.0/8"},
            "client_net": {"allow_nets": "192.0.2.0/24"},
        },
    )
    results = {}
    for user in ("lan", "via_proxy", "client_net"):
        client = await connect(server.plain)
        await client.send(b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 110\r\n")
        assert (await client.line()).startswith(b"+OK")
        await client.send(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
        assert (await client.line()).startswith(b"+OK")
        results[user] = await client.line()
        client.close()
    assert results["lan"] == b"-ERR [AUTH] Authentication failed.\r\n"
    assert results["via_proxy"].startswith(b"+OK Logged in")
    assert results["client_net"].startswith(b"+OK Logged in")


# -- trust: only the load balancers may say where a connection comes from ----------------

# The balancer is 127.0.0.1; a client of its own connects from another loopback address.
BALANCER = ["127.0.0.1/32"]
DIRECT = ("127.0.0.2", 0)


def logout_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "reason=" in r.getMessage()]


async def test_untrusted_peer_is_served_as_a_direct_client(
    connect: Connect, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    server = await start_server(proxy_protocol=True, trusted_proxies=BALANCER)
    client = await connect(server.plain, local_addr=DIRECT)
    await client.login()  # no header: greeted at once, and 127.0.0.2 is loopback
    await client.send(b"QUIT\r\n")
    assert (await client.line()).startswith(b"+OK")
    await until_no_sessions(server)
    (line,) = logout_lines(caplog)
    assert "peer=127.0.0.2:" in line
    assert "reason=quit" in line


@pytest.mark.parametrize("header", ["v1", "v2"])
async def test_header_from_an_untrusted_peer_is_refused(
    connect: Connect,
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    header: str,
) -> None:
    """A client that is not the balancer cannot pass for someone else (a loopback
    address, where plaintext logins are allowed, or an address outside a penalty)."""
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    server = await start_server(proxy_protocol=True, trusted_proxies=BALANCER)
    client = await connect(server.plain, local_addr=DIRECT)
    assert (await client.line()).startswith(b"+OK")
    data = b"PROXY TCP4 127.0.0.9 10.0.0.1 5555 110\r\n" if header == "v1" else v2("127.0.0.9", 5)
    await client.send(data + f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    assert await client.closed() == b"-ERR PROXY header not accepted from this address.\r\n"
    await until_no_sessions(server)
    (line,) = logout_lines(caplog)
    assert "peer=127.0.0.2:" in line
    assert "reason=bad-proxy-header" in line
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not a trusted proxy" in w and "127.0.0.2" in w for w in warnings)


async def test_trusted_peer_without_a_header_is_dropped_and_logged(
    connect: Connect, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(proxy_protocol=True, trusted_proxies=BALANCER)
    client = await connect(server.plain, local_addr=("127.0.0.1", 0))
    await client.send(b"CAPA\r\n")
    with contextlib.suppress(ConnectionResetError):
        assert await client.closed() == b""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("did not start with a PROXY header" in w and "127.0.0.1:" in w for w in warnings)


async def test_local_command_from_the_balancer_is_a_health_check(
    connect: Connect, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """HAProxy's checks send a v2 LOCAL header: served, as the balancer's own address."""
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    server = await start_server(proxy_protocol=True, trusted_proxies=BALANCER)
    client = await connect(server.plain)
    await client.send(v2("192.0.2.7", 5555, command=0x20) + b"CAPA\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK")
    assert b"UIDL" in await client.multiline()
    await client.send(b"QUIT\r\n")
    await client.closed()
    await until_no_sessions(server)
    (line,) = logout_lines(caplog)
    assert "peer=127.0.0.1:" in line


async def test_only_the_listeners_named_expect_headers(
    connect: Connect, start_server: StartServer
) -> None:
    server = await start_server(
        listen=["127.0.0.1:0", "127.0.0.3:0"],
        proxy_protocol=["127.0.0.3:0"],
        trusted_proxies=BALANCER,
    )
    plain, proxied = server.service.plain_addresses
    # Not named: PROXY means nothing here, even from the balancer; it is a bad command.
    client = await connect(plain)
    assert (await client.line()).startswith(b"+OK")
    await client.send(b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 110\r\nCAPA\r\n")
    assert (await client.line()).startswith(b"-ERR")
    assert (await client.line()).startswith(b"+OK")
    # Named: the balancer's connection takes its client's address.
    behind = await connect(proxied, local_addr=("127.0.0.1", 0))
    await behind.send(v2("192.0.2.7", 5555) + b"USER alice\r\n")
    assert (await behind.line()).startswith(b"+OK")
    # 192.0.2.7 is not loopback: the default policy refuses plaintext logins.
    assert (await behind.line()).startswith(b"-ERR")


async def test_implicit_tls_listener_trusts_per_peer(
    start_server: StartServer,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await start_server(proxy_protocol=True, trusted_proxies=BALANCER)
    # A direct client: TLS from its first byte, no header.
    reader, writer = await asyncio.open_connection(
        *server.tls, ssl=client_context, server_hostname="localhost", local_addr=DIRECT
    )
    try:
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"+OK")
        writer.write(f"USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"+OK")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"+OK Logged in")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"+OK 3 ")
    finally:
        writer.close()
    # A direct client sending a header before its handshake: dropped and logged.
    raw_reader, raw_writer = await asyncio.open_connection(*server.tls, local_addr=DIRECT)
    raw_writer.write(v2("127.0.0.9", 5) + b"\x16\x03\x01")
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(raw_reader.read(), 5) == b""
    raw_writer.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not a trusted proxy" in w and "127.0.0.2" in w for w in warnings)


# -- LMTP: the same trust rules, through aiosmtpd's PROXY support -----------------------


@pytest.fixture
async def lmtp() -> AsyncIterator[LmtpService]:
    """LMTP on 127.0.0.1 behind a balancer at 127.0.0.1, delivering into memory."""
    config = lmtp_config(proxy_protocol=True, trusted_proxies=BALANCER)
    service = LmtpService(config, Deliverer(config, MemoryStore(), lmtp_users("alice")))
    await service.start()
    yield service
    await service.stop()


async def lmtp_exchange(
    service: LmtpService, first: bytes, *, local: tuple[str, int]
) -> tuple[bytes, bytes]:
    """Send ``first`` (a header, or nothing) and a delivery to alice: (the replies up
    to DATA's 354, the replies to the final dot); empty once the server has closed."""
    reader, writer = await asyncio.open_connection(*service.addresses[0], local_addr=local)
    try:
        writer.write(
            first + b"LHLO mta.example\r\nMAIL FROM:<s@example.net>\r\n"
            b"RCPT TO:<alice@example.test>\r\nDATA\r\n"
        )
        replies = b""
        with contextlib.suppress(ConnectionResetError):
            while b"354" not in replies:
                chunk = await asyncio.wait_for(reader.read(4096), 5)
                if not chunk:
                    return replies, b""
                replies += chunk
        writer.write(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        return replies, await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_lmtp_logs_the_client_behind_the_balancer(
    lmtp: LmtpService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.lmtp")
    replies, final = await lmtp_exchange(lmtp, v2("192.0.2.7", 5555), local=("127.0.0.1", 0))
    assert replies.startswith(b"220 ")
    assert final.startswith(b"250 2.0.0 ")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("connect from 192.0.2.7:5555 via proxy 127.0.0.1:") for m in messages)


async def test_lmtp_balancer_health_check_and_missing_header(lmtp: LmtpService) -> None:
    local = v2("192.0.2.7", 5555, command=0x20)
    replies, final = await lmtp_exchange(lmtp, local, local=("127.0.0.1", 0))
    assert replies.startswith(b"220 ")
    assert final.startswith(b"250 2.0.0 ")
    # The balancer without a header: no greeting, the connection is closed.
    replies, final = await lmtp_exchange(lmtp, b"", local=("127.0.0.1", 0))
    assert (replies, final) == (b"", b"")
    # A bare TCP check (connect, close) leaves nothing behind.
    _, writer = await asyncio.open_connection(*lmtp.addresses[0])
    writer.close()
    await writer.wait_closed()
    replies, final = await lmtp_exchange(lmtp, local, local=("127.0.0.1", 0))
    assert final.startswith(b"250 2.0.0 ")


async def test_lmtp_direct_client_is_served_and_may_not_send_a_header(
    lmtp: LmtpService, caplog: pytest.LogCaptureFixture
) -> None:
    replies, final = await lmtp_exchange(lmtp, b"", local=DIRECT)
    assert replies.startswith(b"220 ")
    assert final.startswith(b"250 2.0.0 ")
    header = b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 24\r\n"
    replies, final = await lmtp_exchange(lmtp, header, local=DIRECT)
    assert replies.startswith(b"220 ")
    assert replies.endswith(b"421 4.7.0 PROXY header not accepted from this address\r\n")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not a trusted proxy" in w and "127.0.0.2" in w for w in warnings)
