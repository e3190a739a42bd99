"""When our side fails (store, user database), the client gets a response code, never a
traceback, and no mail is lost; the log names the session and the cause."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Collection, Sequence

import pytest

from popbox.auth.base import UserRecord
from popbox.errors import AuthError, PermanentStoreError, StoreError
from popbox.store.base import Maildrop, MessageInfo, WireReadyFile
from popbox.store.mailbox import DEFAULT_VIEW, MailboxView
from popbox.store.memory import MemoryStore
from support.pop3service import (
    APOP_SECRET,
    MESSAGES,
    PASSWORD,
    Connect,
    Raw,
    Server,
    StartServer,
    until_no_sessions,
)
from support.wire import wire


class FaultyMaildrop:
    """A maildrop whose reads or commit fail on request."""

    def __init__(self, inner: Maildrop, faults: set[str]) -> None:
        self._inner = inner
        self._faults = faults

    @property
    def user(self) -> str:
        return self._inner.user

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self._inner.messages

    async def read_message(self, index: int) -> AsyncIterator[bytes]:
        if "open" in self._faults:
            raise StoreError("disk on fire")
        sent = 0
        async for chunk in self._inner.read_message(index):
            if "midway" in self._faults and sent:
                raise StoreError("disk on fire halfway")
            sent += len(chunk)
            yield chunk

    async def open_wire_ready(self, index: int) -> WireReadyFile | None:
        if "open" in self._faults:
            raise StoreError("disk on fire")
        return await self._inner.open_wire_ready(index)

    def mark_retrieved(self, index: int) -> None:
        self._inner.mark_retrieved(index)

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        if "commit" in self._faults:
            await self._inner.release()
            raise StoreError("fsync failed")
        await self._inner.commit_deletions(indexes)

    async def release(self) -> None:
        await self._inner.release()


class FaultyStore:
    def __init__(self, inner: MemoryStore, faults: set[str]) -> None:
        self._inner = inner
        self.faults = faults

    async def open_maildrop(self, user: str, view: MailboxView = DEFAULT_VIEW) -> Maildrop:
        if "login-temp" in self.faults:
            raise StoreError("store unreachable")
        if "login-perm" in self.faults:
            raise PermanentStoreError("maildrop corrupt")
        return FaultyMaildrop(await self._inner.open_maildrop(user, view), self.faults)

    async def deliver(self, user: str, message: bytes) -> str:
        return await self._inner.deliver(user, message)

    async def usage(self, user: str) -> object:
        return await self._inner.usage(user)

    async def close(self) -> None:
        await self._inner.close()


class BrokenPassDB:
    async def verify(self, username: str, password: str) -> UserRecord | None:
        raise AuthError("user database unreachable")

    async def lookup(self, username: str) -> UserRecord | None:
        raise AuthError("user database unreachable")

    async def plaintext_secret(self, username: str) -> str | None:
        raise AuthError("user database unreachable")


async def _faulty(
    start_server: StartServer, *faults: str, messages: list[bytes] | None = None
) -> tuple[Server, FaultyStore]:
    holder: list[FaultyStore] = []

    def wrap(store: MemoryStore) -> FaultyStore:
        holder.append(FaultyStore(store, set(faults)))
        return holder[0]

    server = await start_server(wrap_store=wrap, messages=messages)
    return server, holder[0]


@pytest.mark.parametrize(
    ("fault", "code"), [("login-temp", b"[SYS/TEMP]"), ("login-perm", b"[SYS/PERM]")]
)
async def test_store_failure_at_login_gets_a_response_code(
    connect: Connect, start_server: StartServer, fault: str, code: bytes
) -> None:
    server, _ = await _faulty(start_server, fault)
    client = await connect(server.plain)
    await client.line()
    await client.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    await client.line()
    assert (await client.line()).startswith(b"-ERR " + code)


async def test_user_database_failure_is_sys_temp(
    connect: Connect, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(wrap_passdb=lambda _: BrokenPassDB())
    client = await connect(server.plain)
    await client.line()
    await client.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
    await client.line()
    assert (await client.line()).startswith(b"-ERR [SYS/TEMP]")
    assert any("unreachable" in r.getMessage() or r.exc_info for r in caplog.records)


async def test_unreadable_message_is_sys_temp_and_the_session_goes_on(
    connect: Connect, start_server: StartServer
) -> None:
    server, store = await _faulty(start_server, "open")
    client: Raw = await connect(server.plain)
    await client.login()
    await client.send(b"RETR 1\r\n")
    assert (await client.line()).startswith(b"-ERR [SYS/TEMP]")
    store.faults.clear()
    await client.send(b"RETR 1\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert await client.multiline() == wire(MESSAGES[0])


async def test_store_failure_mid_body_drops_the_connection_without_terminator(
    connect: Connect, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    big = b"Subject: big\n\n" + b"z" * 300_000 + b"\n"
    small = b"Subject: small\n\nhi\n"
    server, _ = await _faulty(start_server, "midway", messages=[big, small])
    client = await connect(server.plain)
    await client.login()
    await client.send(b"DELE 2\r\nRETR 1\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK")
    rest = await client.closed()
    # A client must not mistake the truncated body for the whole message.
    assert not rest.endswith(b"\r\n.\r\n")
    assert b"Traceback" not in rest
    await until_no_sessions(server)
    assert await server.messages() == [big, small]
    assert any("halfway" in r.getMessage() for r in caplog.records)


async def test_failed_commit_answers_sys_temp_and_keeps_the_mail(
    connect: Connect, start_server: StartServer
) -> None:
    server, _ = await _faulty(start_server, "commit")
    client: Raw = await connect(server.plain)
    await client.login()
    await client.send(b"DELE 1\r\nQUIT\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"-ERR [SYS/TEMP]")
    assert await client.closed() == b""
    assert await server.messages() == MESSAGES


async def test_apop_login(connect: Connect, start_server: StartServer) -> None:
    server = await start_server(apop=True)
    client = await connect(server.plain)
    greeting = await client.line()
    timestamp = greeting[greeting.index(b"<") : greeting.index(b">") + 1].decode()
    digest = hashlib.md5((timestamp + APOP_SECRET).encode()).hexdigest()
    await client.send(f"APOP alice {'0' * 32}\r\n".encode())
    assert (await client.line()).startswith(b"-ERR [AUTH]")
    with_password = hashlib.md5((timestamp + PASSWORD).encode()).hexdigest()
    await client.send(f"APOP alice {with_password}\r\n".encode())
    assert (await client.line()).startswith(b"-ERR [AUTH]")  # the login password is no secret
    await client.send(f"APOP alice {digest}\r\nSTAT\r\n".encode())
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK 3 ")


async def test_apop_for_unknown_user_fails_like_a_wrong_digest(
    connect: Connect, start_server: StartServer
) -> None:
    server = await start_server(apop=True)
    client = await connect(server.plain)
    greeting = await client.line()
    timestamp = greeting[greeting.index(b"<") : greeting.index(b">") + 1].decode()
    digest = hashlib.md5((timestamp + PASSWORD).encode()).hexdigest()
    await client.send(f"APOP nobody {digest}\r\n".encode())
    assert (await client.line()).startswith(b"-ERR [AUTH]")

