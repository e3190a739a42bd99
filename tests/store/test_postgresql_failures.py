"""The PostgreSQL store when the database fails: stopped mid-session and mid-delivery,
then started again; and a pool with no connection to give.

What a user would notice: a client gets ``-ERR [SYS/TEMP]`` (StoreError) and an MTA
a 4xx (TemporaryDeliveryError, LMTP 451) while the database is away, nothing that
was committed is lost, nothing half-done is kept, and the same store serves again
once the database is back, without a restart.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from popbox.delivery.deliverer import Deliverer
from popbox.delivery.lmtp import reply_for_error
from popbox.errors import MaildropInUse, StoreError, TemporaryDeliveryError
from popbox.store import Usage
from popbox.store.postgresql import PostgresStore
from popbox.store.postgresql_maildrop import PostgresMaildrop
from popbox.store.postgresql_schema import CHUNK_SIZE
from popbox.wireform import wire_size
from support.clock import FakeClock
from support.lmtp import make_config, users
from support.maildrop import read_all
from support.pgstore import postgres_store
from support.postgres import PostgresServer


@pytest.fixture
async def down_and_up(
    private_postgres: PostgresServer, clock: FakeClock
) -> AsyncIterator[tuple[PostgresServer, PostgresStore]]:
    """A store on a database of its own cluster, which the test stops and starts."""
    store = postgres_store(
        private_postgres.create_database(), clock, pool_timeout=2.0, lease_seconds=1.0
    )
    yield private_postgres, store
    await store.close()


async def open_when_free(store: PostgresStore, user: str) -> PostgresMaildrop:
    """Open once the lease of a session that could not release it has run out."""
    for _ in range(400):
        try:
            return await store.open_maildrop(user)
        except MaildropInUse:
            await asyncio.sleep(0.05)
    raise AssertionError("the lease never ran out")


async def test_a_database_stopped_mid_session_fails_temporarily_and_loses_nothing(
    down_and_up: tuple[PostgresServer, PostgresStore],
) -> None:
    server, store = down_and_up
    messages = [b"Subject: one\n\n1\n", b"Subject: two\n\n2\n"]
    for message in messages:
        await store.deliver("alice", message)
    maildrop = await store.open_maildrop("alice")
    assert await read_all(maildrop, 0) == messages[0]

    server.stop()
    with pytest.raises(StoreError):
        await read_all(maildrop, 1)
    with pytest.raises(StoreError):
        await maildrop.commit_deletions([0])  # QUIT: -ERR [SYS/TEMP], nothing deleted
    with pytest.raises(StoreError):
        await store.open_maildrop("alice")
    with pytest.raises(StoreError):
        await store.deliver("alice", b"Subject: three\n\n3\n")
    with pytest.raises(StoreError):
        await store.usage("alice")

    server.start()
    again = await open_when_free(store, "alice")
    assert [await read_all(again, i) for i in range(len(again.messages))] == messages
    await again.commit_deletions([0])
    await store.deliver("alice", b"Subject: three\n\n3\n")
    expected = wire_size(messages[1]) + wire_size(b"Subject: three\n\n3\n")
    assert await store.usage("alice") == Usage(2, expected)


async def test_a_store_first_used_while_the_database_is_away_starts_when_it_is_back(
    private_postgres: PostgresServer, clock: FakeClock
) -> None:
    dsn = private_postgres.create_database()
    private_postgres.stop()
    store = postgres_store(dsn, clock, pool_timeout=1.0)
    try:
        with pytest.raises(StoreError):
            await store.deliver("alice", b"x\n")
        private_postgres.start()
        await store.deliver("alice", b"x\n")
        assert (await store.usage("alice")).messages == 1
    finally:
        await store.close()


class _StopsMidway(io.RawIOBase):
    """A big message whose reading stops the database after a few chunks."""

    def __init__(self, server: PostgresServer) -> None:
        super().__init__()
        self._server = server
        self._chunks = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self._chunks += 1
        if self._chunks == 3:
            self._server.stop()
        if self._chunks > 6:
            return 0
        view = memoryview(buffer).cast("B")
        view[:] = b"y" * len(view)
        return len(view)


async def test_a_delivery_cut_by_the_database_is_a_4xx_and_stores_nothing(
    down_and_up: tuple[PostgresServer, PostgresStore],
) -> None:
    server, store = down_and_up
    await store.deliver("alice", b"before\n")
    with pytest.raises(StoreError):
        await store.deliver_file("alice", io.BufferedReader(_StopsMidway(server), CHUNK_SIZE))
    deliverer = Deliverer(make_config(), store, users("alice"))
    with pytest.raises(TemporaryDeliveryError) as refused:
        await deliverer.deliver("alice@example.test", "s@example.net", b"Subject: x\n\nx\n")
    assert reply_for_error(refused.value).startswith("451 4.3.0")

    server.start()
    assert await store.usage("alice") == Usage(1, wire_size(b"before\n"))
    with psycopg.connect(server.dsn(_database(store)), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM mail_chunks").fetchone()
    assert row == (1,)  # no piece of the cut message was kept
    await deliverer.deliver("alice@example.test", "s@example.net", b"Subject: x\n\nx\n")
    assert (await store.usage("alice")).messages == 2


def _database(store: PostgresStore) -> str:
    return store.settings.pool.dsn.rsplit("/", 1)[1]


@pytest.fixture
def row_lock(postgres_dsn: str) -> Iterator[psycopg.Connection]:
    """A connection of the test's own that can hold row locks."""
    with psycopg.connect(postgres_dsn) as conn:
        yield conn


async def test_an_exhausted_pool_fails_after_its_timeout_with_a_clear_message(
    postgres_dsn: str, clock: FakeClock, row_lock: psycopg.Connection
) -> None:
    store = postgres_store(postgres_dsn, clock, pool_max=1, pool_timeout=1.0)
    try:
        await store.deliver("alice", b"first\n")
        # Another party holds alice's folder row: the next delivery waits on it with
        # the pool's only connection.
        row_lock.execute("SELECT 1 FROM mail_folders WHERE username = 'alice' FOR UPDATE")
        waiting = asyncio.create_task(store.deliver("alice", b"second\n"))
        await asyncio.sleep(0.2)
        with pytest.raises(StoreError, match="no database connection within the pool timeout"):
            await store.usage("bob")
        row_lock.commit()
        await waiting
        assert (await store.usage("alice")).messages == 2
    finally:
        await store.close()
