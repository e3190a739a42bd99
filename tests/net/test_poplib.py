"""End-to-end with the standard library's poplib: plain, STLS and implicit TLS, real sockets.

poplib is blocking, so each client runs in a thread while the server runs in the
test's event loop.
"""

from __future__ import annotations

import asyncio
import poplib
import socket
import ssl

import pytest

from support.pop3service import MESSAGES, PASSWORD, Server, StartServer, until_no_sessions
from support.wire import wire


def _login(host: str, port: int) -> poplib.POP3:
    client = poplib.POP3(host, port, timeout=10)
    client.user("alice")
    client.pass_(PASSWORD)
    return client


def _body(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


async def test_plain_session_lists_retrieves_and_deletes_only_on_quit(server: Server) -> None:
    def session() -> None:
        client = _login(*server.plain)
        count, size = client.stat()
        assert count == 3
        assert size == sum(len(wire(m)) for m in MESSAGES)
        _, listing, _ = client.list()
        assert listing == [f"{i + 1} {len(wire(m))}".encode() for i, m in enumerate(MESSAGES)]
        _, uidls, _ = client.uidl()
        assert len({line.split()[1] for line in uidls}) == 3
        for number, message in enumerate(MESSAGES, start=1):
            _, lines, _ = client.retr(number)
            assert _body(lines) == wire(message)
        _, top, _ = client.top(2, 1)
        assert _body(top) == b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\n"
        client.dele(1)
        client.dele(2)
        client.rset()
        client.dele(3)
        client.quit()

    await asyncio.to_thread(session)
    assert await server.messages() == MESSAGES[:2]


async def test_deletions_wait_for_quit(server: Server) -> None:
    def dele_without_quit() -> poplib.POP3:
        client = _login(*server.plain)
        client.dele(1)
        return client

    client = await asyncio.to_thread(dele_without_quit)
    # Still open: the store has not been touched (checked through the store's lock).
    await asyncio.to_thread(client.quit)
    assert await server.messages() == MESSAGES[1:]


async def test_dropped_connection_deletes_nothing(server: Server) -> None:
    def drop() -> None:
        client = _login(*server.plain)
        client.dele(1)
        client.dele(2)
        client.sock.close()

    await asyncio.to_thread(drop)
    await until_no_sessions(server)
    assert await server.messages() == MESSAGES


async def test_second_login_gets_in_use(server: Server) -> None:
    def two() -> str:
        first = _login(*server.plain)
        second = poplib.POP3(*server.plain, timeout=10)
        second.user("alice")
        try:
            second.pass_(PASSWORD)
        except poplib.error_proto as exc:
            reply = str(exc)
        else:
            reply = "+OK"
        second.quit()
        first.quit()
        return reply

    reply = await asyncio.to_thread(two)
    assert reply.startswith("b'-ERR [IN-USE]")


async def test_stls_with_certificate_verification(
    server: Server, client_context: ssl.SSLContext
) -> None:
    def session() -> tuple[dict[str, list[str]], bytes]:
        client = poplib.POP3("localhost", server.plain[1], timeout=10)
        assert "STLS" in client.capa()
        client.stls(client_context)
        capabilities = client.capa()
        client.user("alice")
        client.pass_(PASSWORD)
        _, lines, _ = client.retr(2)
        client.quit()
        return capabilities, _body(lines)

    capabilities, body = await asyncio.to_thread(session)
    assert "STLS" not in capabilities
    assert "USER" in capabilities
    assert body == wire(MESSAGES[1])


async def test_implicit_tls_with_certificate_verification(
    server: Server, client_context: ssl.SSLContext
) -> None:
    def session() -> bytes:
        client = poplib.POP3_SSL("localhost", server.tls[1], context=client_context, timeout=10)
        assert "STLS" not in client.capa()
        client.user("alice")
        client.pass_(PASSWORD)
        _, lines, _ = client.retr(3)
        client.dele(3)
        client.quit()
        return _body(lines)

    assert await asyncio.to_thread(session) == wire(MESSAGES[2])
    assert await server.messages() == MESSAGES[:2]


async def test_plaintext_refused_without_tls_when_never(
    start_server: StartServer, client_context: ssl.SSLContext
) -> None:
    server = await start_server(plaintext_auth="never")

    def session() -> tuple[dict[str, list[str]], str, dict[str, list[str]]]:
        client = poplib.POP3("localhost", server.plain[1], timeout=10)
        before = client.capa()
        try:
            client.user("alice")
            client.pass_(PASSWORD)
        except poplib.error_proto as exc:
            refused = str(exc)
        else:
            refused = "+OK"
        client.stls(client_context)
        after = client.capa()
        client.user("alice")
        client.pass_(PASSWORD)
        client.quit()
        return before, refused, after

    before, refused, after = await asyncio.to_thread(session)
    assert "USER" not in before
    assert "SASL" not in before
    assert "-ERR" in refused
    assert "USER" in after


async def test_wrong_password_gets_auth_code(server: Server) -> None:
    def session() -> str:
        client = poplib.POP3(*server.plain, timeout=10)
        client.user("alice")
        with pytest.raises(poplib.error_proto) as failed:
            client.pass_("wrong")
        client.quit()
        return str(failed.value)

    assert "-ERR [AUTH]" in await asyncio.to_thread(session)


async def test_graceful_shutdown_does_not_commit_an_open_session(
    start_server: StartServer,
) -> None:
    server = await start_server(shutdown_grace=0.3)

    def open_and_delete() -> socket.socket:
        client = _login(*server.plain)
        client.dele(1)
        return client.sock

    sock = await asyncio.to_thread(open_and_delete)
    await server.service.shutdown()
    assert server.service.session_count == 0
    assert await server.messages() == MESSAGES
    sock.settimeout(5)
    # Between commands the client is told why, then the connection closes.
    assert (
        await asyncio.to_thread(_read_to_eof, sock) == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
    )
    sock.close()


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def test_a_user_in_another_script_logs_in_after_utf8(start_server: StartServer) -> None:
    # RFC 6856: CAPA says UTF8 USER; poplib's utf8() sends UTF8, then the name goes as
    # UTF-8 (decomposed here, as some keyboards send it: the server compares in NFC).
    server = await start_server(users={"jos\u00e9": {}})
    await server.store.deliver("jos\u00e9", b"Subject: hola\r\n\r\nbody\r\n")

    def session() -> tuple[dict[str, list[str]], bytes, int]:
        client = poplib.POP3(*server.plain, timeout=10)
        client.encoding = "utf-8"
        capabilities = client.capa()
        utf8 = client.utf8()
        client.user("jose\u0301")
        client.pass_(PASSWORD)
        count, _ = client.stat()
        client.quit()
        return capabilities, utf8, count

    capabilities, utf8, count = await asyncio.to_thread(session)
    assert capabilities["UTF8"] == ["USER"]
    assert "LANG" in capabilities
    assert utf8.startswith(b"+OK")
    assert count == 1
