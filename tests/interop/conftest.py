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
from popbox.config import TlsSettings
from popbox.net.scram import scram_mechanisms
from support.interop import PASSWORD, USER, InteropServer, interop_config, serving


@pytest.fixture
async def interop_server(
    tls_files: Any, server_context: ssl.SSLContext, tmp_path: Path
) -> AsyncIterator[InteropServer]:
    # fetchmail insists on a subject CN: the shared certificate has one.
    passdb = MemoryPassDB({USER: PASSWORD})
    async with serving(interop_config(), passdb, server_context, tls_files, tmp_path) as server:
        yield server


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
    config = interop_config(tls=TlsSettings(cert=tls_files.cert, key=tls_files.key))
    passdb = _ScramOnlyPassDB({}, stored={USER: hash_password(PASSWORD, "SCRAM-SHA-256")})
    mechanisms = scram_mechanisms(config.auth.mechanisms, passdb)
    async with serving(
        config, passdb, server_context, tls_files, tmp_path, mechanisms
    ) as server:
        yield server
