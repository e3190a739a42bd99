"""An in-process Pop3Service on loopback with a memory store, and a raw POP3 client.

The net tests start it through the ``start_server`` fixture (tests/net/conftest.py)
with the test mailbox and a config whose limits may go below production minimums;
``Raw`` sends exactly the bytes it is told to and reads replies as they come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, LimitSettings, MailboxSettings, Pop3Settings
from popbox.net.service import Pop3Service
from popbox.store.memory import MemoryStore
from support.maildrop import stored_messages
from support.wire import unstuff

PASSWORD = "correct horse"
# alice's APOP secret: a secret of its own, never the login password.
APOP_SECRET = "apop battery staple"

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nHello\n.leading dot\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
    b"Subject: three\n\nno final newline",
]


def make_config(
    *,
    plaintext_auth: str = "loopback",
    apop: bool = False,
    proxy_protocol: bool | list[str] = False,
    trusted_proxies: list[str] | None = None,
    listen: list[str] | None = None,
    tls_listen: list[str] | None = None,
    mailbox: dict[str, Any] | None = None,
    **limits: Any,
) -> Config:
    """A config on 127.0.0.1:0; ``limits`` may go below the production minimums;
    ``mailbox`` sets [mailbox]. With ``proxy_protocol`` the trusted proxies are all of
    loopback unless ``trusted_proxies`` says otherwise."""
    if trusted_proxies is None:
        trusted_proxies = ["127.0.0.0/8", "::1"] if proxy_protocol else []
    base = LimitSettings().model_dump()
    base.update(auth_failure_delay=0.0, shutdown_grace=1.0)
    base.update(limits)
    return Config(
        pop3=Pop3Settings(
            listen=listen or ["127.0.0.1:0"],
            tls_listen=tls_listen or ["127.0.0.1:0"],
            plaintext_auth=plaintext_auth,  # type: ignore[arg-type]
            apop=apop,
            proxy_protocol=proxy_protocol,
            trusted_proxies=trusted_proxies,
        ),
        # model_construct skips the ge= bounds so tests can use tiny timeouts.
        limits=LimitSettings.model_construct(**base),
        mailbox=MailboxSettings(**(mailbox or {})),
    )


@dataclass
class Server:
    service: Pop3Service
    store: MemoryStore
    passdb: MemoryPassDB
    config: Config

    @property
    def plain(self) -> tuple[str, int]:
        return self.service.plain_addresses[0]

    @property
    def tls(self) -> tuple[str, int]:
        return self.service.tls_addresses[0]

    async def messages(self, user: str = "alice") -> list[bytes]:
        """What is stored for ``user`` now (through a fresh maildrop)."""
        return await stored_messages(self.store, user)


StartServer = Callable[..., Awaitable[Server]]


class Raw:
    """A POP3 client that sends exactly the bytes it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int], **kwargs: object) -> Raw:
        reader, writer = await asyncio.open_connection(*address, **kwargs)  # type: ignore[arg-type]
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), timeout)

    async def multiline(self) -> bytes:
        """The rest of a multi-line reply after its status line, un-stuffed."""
        data = await asyncio.wait_for(self.reader.readuntil(b"\r\n.\r\n"), 10)
        return unstuff(data[: -len(b".\r\n")])

    async def retr(self, number: int, timeout: float = 30.0) -> bytes:
        """RETR ``number``: the body as received (stuffed, terminator included)."""
        await self.send(b"RETR %d\r\n" % number)
        return await self.retr_reply(timeout)

    async def retr_reply(self, timeout: float = 30.0) -> bytes:
        """The reply to a RETR already sent: its body as ``retr`` returns it."""
        status = await self.line()
        assert status.startswith(b"+OK"), status
        body = await asyncio.wait_for(self.reader.readuntil(b".\r\n"), timeout)
        # The terminator is a line of its own: the body's first line or after a CRLF
        # (a body that is one "." line arrives as "..\r\n.\r\n").
        while body != b".\r\n" and not body.endswith(b"\r\n.\r\n"):
            body += await asyncio.wait_for(self.reader.readuntil(b".\r\n"), timeout)
        return body

    async def login(self, user: str = "alice") -> None:
        assert (await self.line()).startswith(b"+OK")
        await self.send(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
        assert (await self.line()).startswith(b"+OK")
        assert (await self.line()).startswith(b"+OK")

    async def closed(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes; fails if it does not within ``timeout``."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


Connect = Callable[..., Awaitable[Raw]]


async def until_no_sessions(server: Server, timeout: float = 10.0) -> None:
    """Wait until every session has ended (maildrop released, logout line written)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server.service.session_count:
        if loop.time() > deadline:
            raise AssertionError("sessions did not end")
        await asyncio.sleep(0.01)
