"""The collector against popbox's own POP3 server (Pop3Service), over verified TLS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from popbox.auth.base import UserRecord
from popbox.auth.memory import MemoryPassDB
from popbox.auth.schemes import hash_password
from popbox.config import Config, LimitSettings, Pop3Settings, TlsSettings
from popbox.net.sasl import MechanismFactory, SaslContext, ServerMechanism
from popbox.net.scram import scram_mechanisms
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


class _ScramOnlyPassDB(MemoryPassDB):
    """Refuses every password check: only a SCRAM login can get in."""

    async def verify(self, username: str, password: str) -> UserRecord | None:
        return None


@pytest.mark.parametrize(
    ("security", "mechanism"),
    [
        ("tls", "SCRAM-SHA-256-PLUS"),
        ("starttls", "SCRAM-SHA-256-PLUS"),
        ("none", "SCRAM-SHA-256"),
    ],
)
async def test_fetch_from_popbox_server_with_scram(
    server_context: ssl.SSLContext,
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    security: str,
    mechanism: str,
) -> None:
    """The collector logs in to popbox with SCRAM, bound to the TLS channel wherever
    there is one; without TLS too, as SCRAM never sends the password."""
    config = Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, shutdown_grace=1),
        tls=TlsSettings(cert=tls_files.cert, key=tls_files.key),
    )
    store = MemoryStore()
    for index in range(3):
        await store.deliver("alice", message(index))
    passdb = _ScramOnlyPassDB({}, stored={"alice": hash_password("secret", "SCRAM-SHA-256")})
    used: list[str] = []

    def recording(name: str, factory: MechanismFactory) -> MechanismFactory:
        def make(context: SaslContext) -> ServerMechanism:
            used.append(name)
            return factory(context)

        return make

    mechanisms = {
        name: recording(name, factory)
        for name, factory in scram_mechanisms(config.auth.mechanisms, passdb).items()
    }
    service = Pop3Service(config, store, passdb, server_context, mechanisms)
    await service.start()
    try:
        addresses = service.tls_addresses if security == "tls" else service.plain_addresses
        monkeypatch.setenv(PASSWORD_ENV, "secret")
        account = account_entry(
            addresses[0][1],
            tmp_path / "out",
            **tls_fields(tls_files.ca),
            security=security,
            auth_mechanism="scram-sha-256",
            delete="after_delivery",
        )
        result = await poll(fetch_settings(tmp_path, account))
    finally:
        await service.shutdown()
    assert result.ok, result.error
    assert result.delivered == 3
    assert used == [mechanism]
    assert await remaining(store) == 0


async def test_a_wrong_password_fails_the_scram_login(
    server_context: ssl.SSLContext,
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, shutdown_grace=1),
        tls=TlsSettings(cert=tls_files.cert, key=tls_files.key),
    )
    passdb = MemoryPassDB({"alice": "secret"})
    mechanisms = scram_mechanisms(config.auth.mechanisms, passdb)
    service = Pop3Service(config, MemoryStore(), passdb, server_context, mechanisms)
    await service.start()
    try:
        monkeypatch.setenv(PASSWORD_ENV, "wrong")
        account = account_entry(
            service.tls_addresses[0][1],
            tmp_path / "out",
            **tls_fields(tls_files.ca),
            security="tls",
            auth_mechanism="scram-sha-256",
        )
        result = await poll(fetch_settings(tmp_path, account))
    finally:
        await service.shutdown()
    assert not result.ok
    assert "AUTH SCRAM-SHA-256-PLUS refused" in str(result.error)
