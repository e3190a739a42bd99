"""A real Pop3Service on 127.0.0.1 (port 0) with MemoryStore, MemoryPassDB and test TLS."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from net_support import MESSAGES, PASSWORD, Server, StartServer, make_config

from popbox.auth.memory import MemoryPassDB
from popbox.net.service import Pop3Service
from popbox.net.tls import make_server_context
from popbox.store.memory import MemoryStore

_HERE = Path(__file__).parent


@pytest.fixture
def server_context(tls_files: Any) -> ssl.SSLContext:
    return make_server_context(tls_files.cert, tls_files.key, "TLSv1.2")


@pytest.fixture
def client_context(tls_files: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    assert context.check_hostname
    return context


@pytest.fixture
async def start_server(server_context: ssl.SSLContext) -> AsyncIterator[StartServer]:
    """Start a service with alice (three messages) and bob; shut every one down after."""
    services: list[Pop3Service] = []

    async def start(
        *, messages: list[bytes] | None = None, tls: bool = True, **options: Any
    ) -> Server:
        config = make_config(**options)
        store = MemoryStore()
        for message in MESSAGES if messages is None else messages:
            await store.deliver("alice", message)
        await store.deliver("bob", b"Subject: bob\n\nhi bob\n")
        passdb = MemoryPassDB({"alice": PASSWORD, "bob": PASSWORD})
        service = Pop3Service(config, store, passdb, server_context if tls else None)
        await service.start()
        services.append(service)
        return Server(service, store, passdb, config)

    yield start
    for service in services:
        await service.shutdown()


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    return await start_server()



if os.environ.get("POPBOX_TEST_UVLOOP"):
    # Defined only on request: the hook is global, and other test areas keep the default.

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
        """Run these tests on uvloop as well: ``popbox serve`` uses it when installed,
        and its transports differ from asyncio's in the details."""
        if _HERE not in item.path.parents:
            return {"asyncio": asyncio.new_event_loop}
        import uvloop

        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
