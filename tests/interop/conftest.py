"""Independent POP3 clients (curl, fetchmail, mpop) against a real Pop3Service.

The server runs in the test's event loop on 127.0.0.1 (port 0); each client runs as a
subprocess with a private HOME so no global state leaks between tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from interop_support import MESSAGES, PASSWORD, USER, InteropServer

from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, LimitSettings, Pop3Settings
from popbox.net.service import Pop3Service
from popbox.net.tls_context import make_server_context
from popbox.store.memory import MemoryStore


@pytest.fixture
async def interop_server(tls_files: Any, tmp_path: Path) -> AsyncIterator[InteropServer]:
    config = Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, shutdown_grace=1),
    )
    store = MemoryStore()
    for message in MESSAGES:
        await store.deliver(USER, message)
    passdb = MemoryPassDB({USER: PASSWORD})
    # fetchmail insists on a subject CN (the shared fixture's certificate has SANs
    # only), so issue one from the same test CA with CN=localhost.
    leaf = tls_files.authority.issue_cert(
        "localhost", "127.0.0.1", "::1", common_name="localhost"
    )
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    context = make_server_context(cert, key, "TLSv1.2")
    service = Pop3Service(config, store, passdb, context)
    await service.start()
    workdir = tmp_path / "client"
    workdir.mkdir()
    try:
        yield InteropServer(service, store, tls_files.ca, workdir)
    finally:
        await service.shutdown()
