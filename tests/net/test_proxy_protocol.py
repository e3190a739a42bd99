"""PROXY protocol v1/v2 in front of the plain and implicit-TLS listeners (HAProxy's setup)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct

import pytest

from popbox.net.proxy import (
    PROXY_V2_SIGNATURE,
    ProxyAddress,
    ProxyHeaderError,
    parse_v1,
    parse_v2,
)
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
