"""A tiny synchronous stand-in for the asyncio glue, so transcripts read like RFC examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from popbox.proto.events import (
    FLUSH,
    NEED_DATA,
    ApopRequest,
    CloseConnection,
    ConnectionClosed,
    Event,
    LoginRequest,
    Quit,
    Retrieve,
    SaslExchange,
    StartTls,
)
from popbox.proto.sasl import apop_digest
from popbox.proto.server import ServerConnection, ServerSettings
from popbox.proto.wire import WireEncoder
from popbox.store.base import MessageInfo
from popbox.wireform import wire_size


def connect(
    settings: ServerSettings | None = None,
    *,
    tls_active: bool = False,
    stls_available: bool = True,
    plaintext_auth_allowed: bool = True,
) -> ServerConnection:
    return ServerConnection(
        settings or ServerSettings(),
        tls_active=tls_active,
        stls_available=stls_available,
        plaintext_auth_allowed=plaintext_auth_allowed,
    )


@dataclass
class Glue:
    """Drives a ServerConnection the way docs/dev/server-api.md says the glue does."""

    conn: ServerConnection
    users: dict[str, str] = field(default_factory=lambda: {"mrose": "tanstaaf"})
    messages: list[bytes] = field(default_factory=list)
    in_use: bool = False
    refusal: tuple[str, str] | None = None
    """A verified login's refusal (code, text), e.g. LOGIN-DELAY."""
    user_values: dict[str, Any] = field(default_factory=dict)
    """The user's own EXPIRE and LOGIN-DELAY, for ``login_succeeded``."""
    commit_fails: bool = False
    unavailable: set[int] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)
    committed: frozenset[int] | None = None
    closed: bool = False
    chunk: int = 7  # odd, so that message bodies cross chunk boundaries

    def infos(self) -> list[MessageInfo]:
        return [MessageInfo(f"uid{i}", wire_size(m)) for i, m in enumerate(self.messages)]

    def send(self, data: bytes) -> bytes:
        """Feed ``data`` and run events until the core needs more; return all replies."""
        self.conn.receive_data(data)
        out = bytearray()
        while not self.closed:
            event = self.conn.next_event()
            out += self.conn.data_to_send()
            self.events.append(event)
            if event is NEED_DATA:
                break
            if event is FLUSH:
                continue
            out += self._act(event)
        return bytes(out)

    def _act(self, event: Event) -> bytes:
        conn = self.conn
        if isinstance(event, LoginRequest | ApopRequest):
            if isinstance(event, ApopRequest):
                secret = self.users.get(event.username)
                good = secret is not None and apop_digest(event.timestamp, secret) == event.digest
            else:
                good = self.users.get(event.username) == event.password
            if not good:
                conn.login_failed("AUTH", "Authentication failed.")
            elif self.in_use:
                conn.login_failed("IN-USE", "Maildrop is locked by another session.")
            elif self.refusal is not None:
                conn.login_failed(*self.refusal)
            else:
                conn.login_succeeded(self.infos(), **self.user_values)
            return b""
        if isinstance(event, SaslExchange):
            # A two-step mechanism the glue runs: "user password" after a prompt, or
            # at once as the initial response.
            if event.data is None or event.data == b"":
                conn.sasl_challenge(b"Who are you?")
            else:
                name, _, password = event.data.decode().partition(" ")
                if self.users.get(name) == password:
                    conn.login_succeeded(self.infos(), **self.user_values)
                else:
                    conn.login_failed("AUTH", "Authentication failed.")
            return b""
        if isinstance(event, StartTls):
            conn.tls_established()
            return b""
        if isinstance(event, Retrieve):
            if event.index in self.unavailable:
                return conn.message_unavailable(event)
            out = bytearray(conn.message_start(event))
            encoder = WireEncoder(event.body_lines)
            data = self.messages[event.index]
            for start in range(0, len(data), self.chunk):
                out += encoder.encode(data[start : start + self.chunk])
                if encoder.done:
                    break
            out += encoder.finish()
            return bytes(out)
        if isinstance(event, Quit):
            self.closed = True
            if self.commit_fails:
                return conn.quit_result(False, len(self.messages))
            self.committed = event.deletions
            return conn.quit_result(True, len(self.messages) - len(event.deletions))
        assert isinstance(event, CloseConnection | ConnectionClosed)
        self.closed = True
        return b""
