"""The collector against popbox's own POP3 server (Pop3Service), over verified TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fetchtools import maildir_messages, message

from popbox.auth.memory import MemoryPassDB
from popbox.collector.config import fetch_settings_from_dict
from popbox.collector.poll import Poller
from popbox.collector.state import StateDB
from popbox.config import Config, LimitSettings, Pop3Settings
from popbox.net.service import Pop3Service
from popbox.net.tls_context import make_server_context
from popbox.store.memory import MemoryStore


@pytest.fixture
async def popbox_server(tls_files: Any) -> AsyncIterator[tuple[Pop3Service, MemoryStore]]:
    config = Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, shutdown_grace=1),
    )
    store = MemoryStore()
    service = Pop3Service(
        config,
        store,
        MemoryPassDB({"alice": "secret"}),
        make_server_context(tls_files.cert, tls_files.key, "TLSv1.2"),
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
    monkeypatch.setenv("POPBOX_TEST_PASSWORD", "secret")
    settings = fetch_settings_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "accounts": [
                {
                    "name": "alice",
                    "host": "127.0.0.1",
                    "port": addresses[0][1],
                    "security": security,
                    "ca_file": str(tls_files.ca),
                    "tls_server_name": "localhost",
                    "username": "alice",
                    "password_env": "POPBOX_TEST_PASSWORD",
                    "delete": "after_delivery",
                    "sinks": [{"kind": "maildir", "path": str(tmp_path / "out")}],
                }
            ],
        },
        tmp_path,
    )
    db = StateDB(settings.state_db_path)
    try:
        result = await Poller(settings.accounts[0], settings, db).run()
    finally:
        db.close()
    assert result.ok, result.error
    assert (result.delivered, result.deleted) == (25, 25)
    assert maildir_messages(tmp_path / "out") == sorted(message(i) for i in range(25))
    assert await remaining(store) == 0
