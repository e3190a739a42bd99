"""The collector against popbox's own POP3 server (Pop3Service), over verified TLS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, LimitSettings, Pop3Settings
from popbox.net.service import Pop3Service
from popbox.store.memory import MemoryStore
from support.fetch import (
    PASSWORD_ENV,
    account_entry,
    fetch_settings,
    maildir_messages,
    message,
    poll,
    tls_fields,
)


@pytest.fixture
async def popbox_server(
    server_context: ssl.SSLContext,
) -> AsyncIterator[tuple[Pop3Service, MemoryStore]]:
    config = Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, shutdown_grace=1),
    )
    store = MemoryStore()
    service = Pop3Service(
        config,
        store,
        MemoryPassDB({"alice": "secret"}),
        server_context,
    )
    await service.start()
    try:
        yield service, store
    finally:
        await service.shutdown()


async def remaining(store: MemoryStore) -> int:
    maildrop = await store.open_maildrop("alice")
    try:
        return len(maildrop.messages)
    finally:
        await maildrop.release()


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_fetch_from_popbox_server(
    popbox_server: tuple[Pop3Service, MemoryStore],
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    security: str,
) -> None:
    service, store = popbox_server
    for index in range(25):
        await store.deliver("alice", message(index))
    addresses = service.tls_addresses if security == "tls" else service.plain_addresses
    monkeypatch.setenv(PASSWORD_ENV, "secret")
    account = account_entry(
        addresses[0][1],
        tmp_path / "out",
        **tls_fields(tls_files.ca),
        security=security,
        delete="after_delivery",
    )
    result = await poll(fetch_settings(tmp_path, account))
    assert result.ok, result.error
    assert (result.delivered, result.deleted) == (25, 25)
    assert maildir_messages(tmp_path / "out") == sorted(message(i) for i in range(25))
    assert await remaining(store) == 0
