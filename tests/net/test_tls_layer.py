"""popbox's own TLS layer (TlsLayer) as clients meet it: close_notify both ways, records
held back while the session is busy, handshakes that never finish or never start.

The clients are blocking ``ssl`` sockets in a thread, with ``suppress_ragged_eofs``
off so that a connection closed without close_notify is an error, as a strict client
sees it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from popbox.net.tls import TlsLayer
from support.pop3service import MESSAGES, PASSWORD, Connect, StartServer, until_no_sessions
from support.wire import wire


def _tls_client(
    context: ssl.SSLContext, address: tuple[str, int], *, stls: bool
) -> tuple[ssl.SSLSocket, socket.socket]:
    raw = socket.create_connection(address, timeout=10)
    if stls:
        greeting = raw.recv(1000)
        assert greeting.startswith(b"+OK")
        raw.sendall(b"STLS\r\n")
        assert raw.recv(1000).startswith(b"+OK")
    tls = context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
    if not stls:
        assert _line(tls).startswith(b"+OK")
    return tls, raw


def _line(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


def _read_to_close_notify(sock: ssl.SSLSocket) -> bytes:
    """Everything until the server's close_notify (SSLEOFError if it never comes)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def test_quit_over_tls_ends_with_close_notify(
    start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    server = await start_server()

    def session(stls: bool) -> bytes:
        sock, _ = _tls_client(client_context, server.tls if not stls else server.plain, stls=stls)
        with sock:
            sock.sendall(f"USER alice\r\nPASS {PASSWORD}\r\nDELE 1\r\nQUIT\r\n".encode())
            return _read_to_close_notify(sock)

    for stls in (False, True):
        replies = await asyncio.to_thread(session, stls)
        assert replies.count(b"+OK") == 4, replies
        assert replies.endswith(b"\r\n")
    await until_no_sessions(server)
    # Both QUITs committed their DELE: the QUIT reply, then a clean TLS close.
    assert await server.messages() == MESSAGES[2:]


async def test_client_close_notify_ends_the_session_without_deleting(
    start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    """close_notify is an end of file, not a QUIT: the DELE is not committed, and the
    server answers with its own close_notify (unwrap() waits for it)."""
    server = await start_server()

    def session() -> None:
        sock, _ = _tls_client(client_context, server.tls, stls=False)
        sock.sendall(f"USER alice\r\nPASS {PASSWORD}\r\nDELE 1\r\n".encode())
        for _ in range(3):
            assert _line(sock).startswith(b"+OK")
        plain = sock.unwrap()
        plain.close()

    await asyncio.to_thread(session)
    await until_no_sessions(server)
    assert await server.messages() == MESSAGES


async def test_commands_in_separate_records_behind_a_login_are_all_answered(
    start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    """A client that pipelines one command per TLS record: the records behind PASS wait
    in the TLS layer while the login runs, and every one is answered, in order."""
    server = await start_server()
    count = 200

    def session() -> bytes:
        sock, _ = _tls_client(client_context, server.tls, stls=False)
        with sock:
            sock.sendall(b"USER alice\r\n")
            sock.sendall(f"PASS {PASSWORD}\r\n".encode())
            for number in range(count):
                sock.sendall(f"LIST {number % 3 + 1}\r\n".encode())
            sock.sendall(b"RETR 2\r\nQUIT\r\n")
            return _read_to_close_notify(sock)

    replies = await asyncio.to_thread(session)
    lines = replies.split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    assert lines[1].startswith(b"+OK")
    listed = lines[2 : 2 + count]
    assert [line.split()[1] for line in listed] == [str(n % 3 + 1).encode() for n in range(count)]
    assert wire(MESSAGES[1]) in replies
    assert lines[-1] == b""
    assert lines[-2].startswith(b"+OK")  # QUIT's, after the RETR's body
    assert lines[-3] == b"."


async def test_garbage_instead_of_a_client_hello_never_becomes_a_session(
    connect: Connect, start_server: StartServer
) -> None:
    """A plaintext client on the implicit-TLS port (credentials in the clear) gets no
    greeting and no session; the connection is dropped."""
    server = await start_server()
    client = await connect(server.tls)
    await client.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    rest = await client.closed()
    assert b"+OK" not in rest
    assert server.service.session_count == 0


async def test_shutdown_drops_connections_still_in_their_handshake(
    connect: Connect, start_server: StartServer
) -> None:
    """A connection that never sends a ClientHello is not a session to wait for: shutdown
    drops it at once instead of waiting out the handshake timeout."""
    server = await start_server(tls_handshake_timeout=3600)
    client = await connect(server.tls)
    hub = server.service._hub
    assert hub is not None
    for _ in range(500):
        if hub.handshakes:
            break
        await asyncio.sleep(0.01)
    assert len(hub.handshakes) == 1
    assert all(isinstance(layer, TlsLayer) for layer in hub.handshakes)
    await asyncio.wait_for(server.service.shutdown(), 10)
    assert await client.closed() == b""
    assert not hub.handshakes
