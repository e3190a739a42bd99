"""Fixtures for delivery tests: an LmtpService on a real loopback port, in its own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from popbox.auth.base import PassDB
from popbox.config import Config
from popbox.delivery.deliverer import Deliverer
from popbox.delivery.lmtp import LmtpService
from popbox.store.base import MailStore
from popbox.store.memory import MemoryStore
from support.lmtp import RunningLmtp, StartLmtp, make_config, users


@pytest.fixture
def start_lmtp() -> Iterator[StartLmtp]:
    """Start an LmtpService delivering into ``store`` for the users of ``passdb``, in a
    thread; stopped at teardown."""
    running: list[RunningLmtp] = []

    def start(
        config: Config | None = None,
        store: MailStore | None = None,
        passdb: PassDB | None = None,
    ) -> RunningLmtp:
        config = config or make_config()
        store = store or MemoryStore()
        passdb = passdb or users("alice", "bob")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        service = LmtpService(config, Deliverer(config, store, passdb))
        asyncio.run_coroutine_threadsafe(service.start(), loop).result(10)
        server = RunningLmtp(service, store, passdb, loop, thread)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()
        server.loop.close()
