"""The session turns the protocol core's errors into the collector's, keeping the cause.

A server that breaks the protocol is a RemoteServerError (as a refusal is) and an
account whose username would smuggle a command is a CollectorError; either way the
core's own error stays reachable as ``__cause__`` for the log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.client import Pop3Session
from popbox.collector.config import AccountSettings, fetch_settings_from_dict
from popbox.errors import CollectorError, LineTooLong, ProtocolError, RemoteServerError


def _account(tmp_path: Path, **fields: Any) -> AccountSettings:
    entry: dict[str, Any] = {
        "name": "acct",
        "host": "127.0.0.1",
        "security": "none",
        "allow_plaintext_password": True,
        "username": "alice",
        "password_env": "UNUSED",
        "command_timeout": 5,
        "sinks": [{"kind": "maildir", "path": str(tmp_path / "out")}],
    }
    entry.update(fields)
    settings = fetch_settings_from_dict({"state_dir": str(tmp_path), "accounts": [entry]}, tmp_path)
    return settings.accounts[0]


class _ScriptedServer:
    """A POP3 "server" that sends its whole script at once and records what it got."""

    def __init__(self, script: bytes) -> None:
        self.script = script
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.script)
        while data := await reader.read(65536):
            self.received += data
        writer.close()


async def test_a_reply_that_is_not_a_status_line_is_a_remote_server_error(tmp_path: Path) -> None:
    async with _ScriptedServer(b"+OK hi\r\n-ERR no CAPA\r\n* garbage\r\n") as server:
        session = await Pop3Session.open(_account(tmp_path, port=server.port))
        with pytest.raises(RemoteServerError, match="neither \\+OK nor -ERR") as caught:
            await session.login_password("secret")
        await session.close()
    assert type(caught.value.__cause__) is ProtocolError
    assert caught.value.code is None


async def test_an_endless_reply_line_is_a_remote_server_error(tmp_path: Path) -> None:
    async with _ScriptedServer(b"+OK " + b"a" * 10_000) as server:
        with pytest.raises(RemoteServerError, match="longer than 4096 octets") as caught:
            await Pop3Session.open(_account(tmp_path, port=server.port))
    assert isinstance(caught.value.__cause__, LineTooLong)


async def test_a_username_with_a_line_break_is_the_accounts_error(tmp_path: Path) -> None:
    async with _ScriptedServer(b"+OK hi\r\n-ERR no CAPA\r\n") as server:
        account = _account(tmp_path, port=server.port, username="bob\r\nDELE 1")
        session = await Pop3Session.open(account)
        with pytest.raises(CollectorError, match="refusing to send USER") as caught:
            await session.login_password("secret")
        await session.close()
    assert not isinstance(caught.value, RemoteServerError)
    assert isinstance(caught.value.__cause__, ValueError)
    assert b"DELE" not in server.received


async def test_plaintext_injected_after_stls_is_a_remote_server_error(tmp_path: Path) -> None:
    script = b"+OK hi\r\n+OK\r\nSTLS\r\n.\r\n+OK go ahead\r\n+OK injected\r\n"
    async with _ScriptedServer(script) as server:
        account = _account(tmp_path, port=server.port, security="starttls")
        with pytest.raises(RemoteServerError, match="after STLS") as caught:
            await Pop3Session.open(account)
    assert type(caught.value.__cause__) is ProtocolError
