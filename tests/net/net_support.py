"""Helpers for the net tests: the test mailbox, the wire form of a message, a tiny config."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, LimitSettings, Pop3Settings
from popbox.net.service import Pop3Service
from popbox.store.memory import MemoryStore

PASSWORD = "correct horse"

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nHello\n.leading dot\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
    b"Subject: three\n\nno final newline",
]


def wire(message: bytes) -> bytes:
    """What a POP3 client sees after un-stuffing: CRLF line ends and a final CRLF."""
    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def make_config(*, plaintext_auth: str = "loopback", **limits: Any) -> Config:
    """A config on 127.0.0.1:0; ``limits`` may go below the production minimums."""
    base = LimitSettings().model_dump()
    base.update(auth_failure_delay=0.0, shutdown_grace=1.0)
    base.update(limits)
    return Config(
        pop3=Pop3Settings(
            listen=["127.0.0.1:0"],
            tls_listen=["127.0.0.1:0"],
            plaintext_auth=plaintext_auth,  # type: ignore[arg-type]
        ),
        # model_construct skips the ge= bounds so tests can use tiny timeouts.
        limits=LimitSettings.model_construct(**base),
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
        maildrop = await self.store.open_maildrop(user)
        try:
            out = []
            for index in range(len(maildrop.messages)):
                out.append(b"".join([c async for c in maildrop.read_message(index)]))
            return out
        finally:
            await maildrop.release()


StartServer = Callable[..., Awaitable[Server]]
