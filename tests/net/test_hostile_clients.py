"""Tests named after what hostile or careless clients do, over real sockets.

Each drives the server with raw bytes so the test controls exactly what is sent in one
write and what is (not) read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import pytest

from popbox.net.flow import WRITE_HIGH_WATER
from popbox.net.transaction import WRITE_BATCH
from support.pop3service import MESSAGES, Connect, StartServer, until_no_sessions
from support.wire import unstuff, wire

# StreamReader.readuntil() must hold a whole multi-line reply.
LARGE = 16 * 1024 * 1024


async def test_stls_command_injection_is_discarded(
    connect: Connect, start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    """CVE-2011-0411: a CAPA pipelined after STLS in plaintext must never be answered."""
    server = await start_server()
    client = await connect(server.plain)
    await client.line()
    await client.send(b"STLS\r\nCAPA\r\n")
    assert (await client.line()).startswith(b"+OK")
    await client.writer.start_tls(client_context, server_hostname="localhost")
    await client.send(b"CAPA\r\n")
    assert (await client.line()).startswith(b"+OK")
    capabilities = await client.multiline()
    assert b"STLS" not in capabilities
    await client.send(b"QUIT\r\n")
    # Had the injected CAPA been answered, a second capability list would come here.
    assert b"signing off" in await client.line()
    client.close()


async def test_pipelined_retrs_answer_in_order_byte_exact(
    connect: Connect, start_server: StartServer
) -> None:
    messages = [f"Subject: {i}\n\n.{i}\n{'x' * (i * 997)}\n".encode() for i in range(50)]
    server = await start_server(messages=messages)
    client = await connect(server.plain)
    await client.login()
    await client.send(b"".join(f"RETR {i}\r\n".encode() for i in range(1, 51)) + b"QUIT\r\n")
    for message in messages:
        assert await client.line() == f"+OK {len(wire(message))} octets\r\n".encode()
        assert await client.multiline() == wire(message)
    assert (await client.line()).startswith(b"+OK")
    assert await client.closed() == b""


async def test_large_message_is_streamed_byte_exact(
    connect: Connect, start_server: StartServer
) -> None:
    line = b"".join(bytes([65 + i % 26]) * 70 + b"\n" for i in range(26))
    big = b"Subject: big\n\n" + line * (24 * 1024 * 1024 // len(line)) + b".\n"
    server = await start_server(messages=[big])
    client = await connect(server.plain)
    await client.login()
    await client.send(b"RETR 1\r\n")
    assert await client.line() == f"+OK {len(wire(big))} octets\r\n".encode()
    # Read slowly at first so that the server has to wait on flow control.
    buffered = _write_buffers(server)
    received = bytearray()
    while not received.endswith(b"\r\n.\r\n"):
        received += await asyncio.wait_for(client.reader.read(1 << 20), 10)
        buffered = max(buffered, _write_buffers(server))
    assert unstuff(bytes(received[:-3])) == wire(big)
    assert buffered <= WRITE_HIGH_WATER + 2 * WRITE_BATCH + 4096
    client.close()


async def test_client_that_pipelines_retrs_and_never_reads_is_bounded(
    connect: Connect,
    start_server: StartServer,
) -> None:
    """Issue 5: hundreds of RETRs and no reading must not grow the server's buffers."""
    message = b"Subject: x\n\n" + b"y" * 200_000 + b"\n"
    server = await start_server(messages=[message])
    client = await connect(server.plain)
    await client.login()
    # Small socket buffers on our side fill quickly; the rest must stay in the kernel.
    await client.send(b"RETR 1\r\n" * 500)
    await asyncio.sleep(0.5)
    sessions = list(server.service._hub.sessions)  # type: ignore[union-attr]
    assert len(sessions) == 1
    conn = sessions[0]._conn
    assert conn is not None
    assert _write_buffers(server) <= WRITE_HIGH_WATER + 2 * WRITE_BATCH + 4096
    # The unread commands wait in the kernel's socket buffers, not in ours.
    assert conn._lines.buffered < 64 * 1024
    client.writer.transport.abort()


async def test_silent_client_is_cut_by_login_timeout(
    connect: Connect, start_server: StartServer
) -> None:
    server = await start_server(login_timeout=0.3)
    client = await connect(server.plain)
    await client.line()
    assert (await client.closed(timeout=3)).startswith(b"-ERR")


async def test_slow_loris_does_not_reset_login_timeout(
    connect: Connect, start_server: StartServer
) -> None:
    """A byte at a time never completes a command, so it never counts as activity."""
    server = await start_server(login_timeout=0.5)
    client = await connect(server.plain)
    await client.line()
    reply = asyncio.create_task(client.reader.read())
    command = b"USER alice-with-a-long-name-typed-slowly\r\n"
    typed = 0
    with contextlib.suppress(ConnectionError):
        for byte in command:
            if reply.done():
                break
            await client.send(bytes([byte]))
            typed += 1
            await asyncio.sleep(0.05)
    assert (await asyncio.wait_for(reply, 5)).startswith(b"-ERR")
    # Cut while still typing (the whole line takes four login timeouts to trickle in).
    assert typed < len(command)


async def test_idle_timeout_after_login(connect: Connect, start_server: StartServer) -> None:
    server = await start_server(idle_timeout=0.3)
    client = await connect(server.plain)
    await client.login()
    await client.send(b"DELE 1\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert (await client.closed()).startswith(b"-ERR")
    await until_no_sessions(server)
    assert await server.messages() == MESSAGES


async def test_bad_command_budget_closes(connect: Connect, start_server: StartServer) -> None:
    server = await start_server(max_bad_commands=3)
    client = await connect(server.plain)
    await client.line()
    await client.send(b"BOGUS\r\n" * 10)
    rest = await client.closed()
    assert rest.count(b"-ERR") == 3


async def test_connections_per_ip_are_capped(connect: Connect, start_server: StartServer) -> None:
    server = await start_server(max_connections_per_ip=2)
    first = await connect(server.plain)
    second = await connect(server.plain)
    assert (await first.line()).startswith(b"+OK")
    assert (await second.line()).startswith(b"+OK")
    third = await connect(server.plain)
    assert await third.closed() == b"-ERR [SYS/TEMP] too many connections\r\n"
    first.close()
    hub = server.service._hub
    assert hub is not None
    for _ in range(500):  # until the server has seen the first one go
        if hub.per_ip.get("127.0.0.1") == 1:
            break
        await asyncio.sleep(0.01)
    fourth = await connect(server.plain)
    assert (await fourth.line()).startswith(b"+OK")
    second.close()
    fourth.close()


async def test_stalled_tls_handshake_is_cut(connect: Connect, start_server: StartServer) -> None:
    server = await start_server(tls_handshake_timeout=0.3)
    client = await connect(server.tls)
    assert await client.closed(timeout=3) == b""
    plain = await connect(server.plain)
    await plain.line()
    await plain.send(b"STLS\r\n")
    assert (await plain.line()).startswith(b"+OK")
    assert await plain.closed(timeout=3) == b""
    await until_no_sessions(server)
    assert server.service.session_count == 0


async def test_failed_logins_are_delayed_and_limited(
    connect: Connect, start_server: StartServer
) -> None:
    server = await start_server(auth_failure_delay=0.2, max_auth_failures=2)
    client = await connect(server.plain)
    await client.line()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send(b"USER alice\r\nPASS nope\r\nUSER alice\r\nPASS nope\r\n")
    rest = await client.closed()
    assert rest.count(b"-ERR [AUTH]") == 2
    # Waiting is the behaviour itself and only the clock shows it (a lower bound: a
    # sleep never ends early, so this cannot fail on a loaded machine).
    assert loop.time() - started >= 0.4


async def test_logout_line_counts_what_happened(
    connect: Connect, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    client = await connect(server.plain)
    await client.login()
    await client.send(b"RETR 1\r\nTOP 2 0\r\nDELE 1\r\nQUIT\r\n")
    await client.closed()
    await until_no_sessions(server)
    lines = [r.getMessage() for r in caplog.records if "reason=" in r.getMessage()]
    assert len(lines) == 1
    assert "user=alice" in lines[0]
    # Octets sent for the body: the wire form, one stuffed dot, the terminator.
    assert f"retr=1/{len(wire(MESSAGES[0])) + 1 + 3} " in lines[0]
    assert "top=1" in lines[0]
    assert "del=1" in lines[0]
    assert "tls=no" in lines[0]
    assert "reason=quit" in lines[0]


def _write_buffers(server: object) -> int:
    hub = server.service._hub  # type: ignore[attr-defined]
    return sum(
        s.transport.get_write_buffer_size()
        for s in hub.sessions
        if s.transport is not None and not s.transport.is_closing()
    )


@pytest.mark.parametrize("stls", [True, False], ids=["stls", "implicit-tls"])
async def test_pipelined_large_retrs_over_tls_are_byte_exact(
    connect: Connect, start_server: StartServer, client_context: ssl.SSLContext, stls: bool
) -> None:
    """TLS flow control (the SSL transport's pause/resume) under a pipelined download."""
    chunk = b"".join(b".%d dotted line\n" % i for i in range(1000))
    messages = [b"Subject: %d\n\n" % n + chunk * (n + 1) * 40 for n in range(5)]
    server = await start_server(messages=messages)
    if stls:
        client = await connect(server.plain, limit=LARGE)
        await client.line()
        await client.send(b"STLS\r\n")
        assert (await client.line()).startswith(b"+OK")
        await client.writer.start_tls(client_context, server_hostname="localhost")
        await client.send(b"CAPA\r\n")
        await client.line()
        await client.multiline()
    else:
        client = await connect(
            server.tls, ssl=client_context, server_hostname="localhost", limit=LARGE
        )
        await client.line()
    await client.send(b"USER alice\r\nPASS correct horse\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK")
    await client.send(b"".join(b"RETR %d\r\n" % n for n in range(1, 6)) + b"QUIT\r\n")
    for message in messages:
        assert await client.line() == b"+OK %d octets\r\n" % len(wire(message))
        assert await client.multiline() == wire(message)
    assert (await client.line()).startswith(b"+OK")


async def test_half_closed_client_still_gets_every_reply(
    connect: Connect, start_server: StartServer
) -> None:
    """`printf '...QUIT' | nc host 110`: the client shuts its side after the last command;
    the pipelined commands are still answered and QUIT still commits."""
    server = await start_server()
    client = await connect(server.plain)
    await client.send(b"USER alice\r\nPASS correct horse\r\nDELE 1\r\nRETR 2\r\nQUIT\r\n")
    client.writer.write_eof()
    everything = await client.closed()
    replies = everything.split(b"\r\n")
    assert replies[0].startswith(b"+OK")  # greeting
    assert b"Logging out" in everything
    assert await server.messages() == MESSAGES[1:]


async def test_thousands_of_pipelined_cheap_commands_answer_in_order(
    connect: Connect, start_server: StartServer
) -> None:
    """Replies the core makes by itself past its output high-water mark (FLUSH) still
    come out complete and in order."""
    server = await start_server()
    client = await connect(server.plain)
    await client.login()
    await client.send(b"LIST\r\nUIDL 2\r\nSTAT\r\n" * 2000 + b"QUIT\r\n")
    for _ in range(2000):
        assert (await client.line()).startswith(b"+OK")
        listing = await client.multiline()
        assert listing.count(b"\r\n") == 3
        assert (await client.line()).startswith(b"+OK 2 ")
        assert (await client.line()).startswith(b"+OK 3 ")
    assert b"Logging out" in await client.line()
