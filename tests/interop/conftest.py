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

from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, LimitSettings, Pop3Settings
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
