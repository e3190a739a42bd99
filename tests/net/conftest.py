"""A real Pop3Service on 127.0.0.1 (port 0) with MemoryStore, MemoryPassDB and test TLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from popbox.auth.base import PassDB, UserRecord
from popbox.auth.memory import MemoryPassDB
from popbox.net.sasl import Mechanisms
from popbox.net.service import Pop3Service
from popbox.store.base import MailStore
from popbox.store.memory import MemoryStore
from support.pop3service import (
    APOP_SECRET,
    MESSAGES,
    PASSWORD,
    Connect,
    Raw,
    Server,
    StartServer,
    make_config,
)

_HERE = Path(__file__).parent


@pytest.fixture
async def start_server(server_context: ssl.SSLContext) -> AsyncIterator[StartServer]:
    """Start a service with alice (three messages) and bob; shut every one down after."""
    services: list[Pop3Service] = []

    async def start(
        *,
        messages: list[bytes] | None = None,
        tls: bool = True,
        wrap_store: Callable[[MemoryStore], MailStore] | None = None,
        wrap_passdb: Callable[[MemoryPassDB], PassDB] | None = None,
        users: Mapping[str, Mapping[str, str]] | None = None,
        clock: Callable[[], float] | None = None,
        mechanisms: Mechanisms | None = None,
        **options: Any,
    ) -> Server:
        """``wrap_store``/``wrap_passdb`` put a fault-injecting layer before the backend;
        ``users`` adds users (password PASSWORD) with their passwd extra fields;
        ``clock`` is the time the store believes it is; ``mechanisms`` are the SASL
        mechanisms the glue runs."""
        config = make_config(**options)
        offered = config.auth.mechanisms
        for name in mechanisms or {}:
            if name not in offered:  # as the config does for [auth.oauth]: before PLAIN
                offered.insert(offered.index("PLAIN"), name)
        store = MemoryStore() if clock is None else MemoryStore(clock=clock)
        for message in MESSAGES if messages is None else messages:
            await store.deliver("alice", message)
        await store.deliver("bob", b"Subject: bob\n\nhi bob\n")
        extra = dict(users or {})
        passdb = MemoryPassDB(
            dict.fromkeys(["alice", "bob", *extra], PASSWORD),
            {name: UserRecord(name, extra=dict(fields)) for name, fields in extra.items()},
            apop_secrets={"alice": APOP_SECRET},
        )
        service = Pop3Service(
            config,
            wrap_store(store) if wrap_store else store,
            wrap_passdb(passdb) if wrap_passdb else passdb,
            server_context if tls else None,
            mechanisms,
        )
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


@pytest.fixture
async def connect(start_server: StartServer) -> AsyncIterator[Connect]:
    """Open raw clients; every one is closed at the end of the test, before the servers
    shut down (which would otherwise wait out their grace period)."""
    clients: list[Raw] = []

    async def open_client(address: tuple[str, int], **kwargs: object) -> Raw:
        client = await Raw.connect(address, **kwargs)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.writer.close()
        with contextlib.suppress(Exception):
            await client.writer.wait_closed()
