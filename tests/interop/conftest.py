"""Independent POP3 clients (curl, fetchmail, mpop) against a real Pop3Service.

The server runs in the test's event loop on 127.0.0.1 (port 0); each client runs as a
subprocess with a private HOME so no global state leaks between tests.
"""

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
from popbox.net.scram import scram_mechanisms
from popbox.net.service import Pop3Service
from popbox.store.memory import MemoryStore
from support.interop import MESSAGES, PASSWORD, USER, InteropServer


@pytest.fixture
async def interop_server(
    tls_files: Any, server_context: ssl.SSLContext, tmp_path: Path
) -> AsyncIterator[InteropServer]:
    config = Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, shutdown_grace=1),
    )
    store = MemoryStore()
    for message in MESSAGES:
        await store.deliver(USER, message)
    passdb = MemoryPassDB({USER: PASSWORD})
    # fetchmail insists on a subject CN: the shared certificate has one.
    service = Pop3Service(config, store, passdb, server_context)
    await service.start()
    workdir = tmp_path / "client"
    workdir.mkdir()
    try:
        yield InteropServer(service, store, tls_files.ca, workdir)
    finally:
        await service.shutdown()


class _ScramOnlyPassDB(MemoryPassDB):
    async def verify(self, username: str, password: str) -> UserRecord | None:
        return None


@pytest.fixture
async def scram_interop_server(
    tls_files: Any, server_context: ssl.SSLContext, tmp_path: Path
) -> AsyncIterator[InteropServer]:
    """The same mailbox behind a stored {SCRAM-SHA-256} key, offering SCRAM-SHA-256
    and (inside TLS) SCRAM-SHA-256-PLUS bound to the certificate. Password checks
    (USER/PASS, PLAIN) all fail: a client that logs in used SCRAM."""
    config = Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, shutdown_grace=1),
        tls=TlsSettings(cert=tls_files.cert, key=tls_files.key),
    )
    store = MemoryStore()
    for message in MESSAGES:
        await store.deliver(USER, message)
    passdb = _ScramOnlyPassDB({}, stored={USER: hash_password(PASSWORD, "SCRAM-SHA-256")})
    mechanisms = scram_mechanisms(config.auth.mechanisms, passdb)
    service = Pop3Service(config, store, passdb, server_context, mechanisms)
    await service.start()
    workdir = tmp_path / "client"
    workdir.mkdir()
    try:
        yield InteropServer(service, store, tls_files.ca, workdir)
    finally:
        await service.shutdown()
