"""STARTTLS attacks over real sockets and real TLS, each test named after its attack
(the 2021 "NO STARTTLS" study's classes: command injection, response injection,
STLS where it makes no sense)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest

from popbox.collector.client import Pop3Session as CollectorSession
from popbox.collector.config import AccountSettings
from popbox.errors import RemoteServerError
from support.pop3service import PASSWORD, Connect, StartServer


async def test_credentials_injected_in_plaintext_after_stls_do_not_log_in(
    connect: Connect, start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    """CVE-2011-0411 class: a man in the middle appends USER/PASS after the client's
    STLS; executed inside the TLS session they would log the victim in as the
    attacker (or the attacker in with stolen words)."""
    server = await start_server()
    client = await connect(server.plain)
    await client.line()
    await client.send(f"STLS\r\nUSER alice\r\nPASS {PASSWORD}\r\n".encode())
    assert (await client.line()).startswith(b"+OK")
    await client.writer.start_tls(client_context, server_hostname="localhost")
    await client.send(b"STAT\r\n")
    # Still not logged in: the injected commands were discarded, never answered.
    assert await client.line() == b"-ERR STAT is not allowed now.\r\n"
    client.close()


async def test_stls_sent_twice_is_refused_inside_tls(
    connect: Connect, start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    server = await start_server()
    client = await connect(server.plain)
    await client.line()
    await client.send(b"STLS\r\n")
    assert (await client.line()).startswith(b"+OK")
    await client.writer.start_tls(client_context, server_hostname="localhost")
    await client.send(b"STLS\r\nCAPA\r\n")
    assert (await client.line()).startswith(b"-ERR")
    # The session is intact: the next command is answered inside the same TLS.
    assert (await client.line()).startswith(b"+OK")
    client.close()


async def test_stls_on_implicit_tls_is_refused(
    connect: Connect, start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    server = await start_server()
    client = await connect(server.tls, ssl=client_context, server_hostname="localhost")
    await client.line()
    await client.send(b"STLS\r\n")
    assert (await client.line()).startswith(b"-ERR")
    client.close()


async def test_stls_after_login_is_refused(connect: Connect, start_server: StartServer) -> None:
    """After login the session carries mail; switching layers mid-way is not allowed
    (RFC 2595 section 4: STLS only in AUTHORIZATION)."""
    server = await start_server()
    client = await connect(server.plain)
    await client.login()
    await client.send(b"STLS\r\nSTAT\r\n")
    assert (await client.line()).startswith(b"-ERR")
    assert (await client.line()).startswith(b"+OK 3 ")
    client.close()


@pytest.fixture
async def injecting_server() -> AsyncIterator[tuple[str, int]]:
    """A man in the middle: answers STLS with +OK and a forged reply in the same packet,
    before any TLS handshake, hoping the client reads it as coming over TLS."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK fake server\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line.strip().upper()
                if verb == b"CAPA":
                    writer.write(b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")
                elif verb == b"STLS":
                    writer.write(b"+OK Begin TLS\r\n+OK\r\nUSER\r\n.\r\n")
                else:
                    writer.write(b"-ERR no\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[:2]
    server.close()


async def test_response_injected_before_the_tls_handshake_is_refused_by_the_collector(
    injecting_server: tuple[str, int],
) -> None:
    """The client side of CVE-2011-0411: the forged CAPA (advertising plain USER, no
    STLS) must never be taken as the server's answer inside TLS."""
    host, port = injecting_server
    account = AccountSettings.model_validate(
        {
            "name": "victim",
            "host": host,
            "port": port,
            "security": "starttls",
            "username": "alice",
            "password_env": "POPBOX_TEST_UNUSED_PASSWORD",
            "sinks": [{"kind": "maildir", "path": "/nonexistent"}],
        }
    )
    with pytest.raises(RemoteServerError, match="before the TLS handshake"):
        await CollectorSession.open(account)
