"""An MTA that delivers the same message again (its retry after the 250 was lost) gets
250 and the mailbox holds one copy, in the stores that record delivery ids
(PostgreSQL, memory with a window); other recipients and other messages are
stored as always."""

from __future__ import annotations

import smtplib
from collections.abc import AsyncIterator

import pytest

from popbox.delivery.deliverer import Deliverer, delivery_id
from popbox.store.base import MailStore
from popbox.store.memory import MemoryStore
from popbox.store.postgresql import DUPLICATE_WINDOW
from support.clock import FakeClock
from support.lmtp import StartLmtp, make_config, users
from support.pgstore import postgres_store

MESSAGE = b"Received: from mx.example.net by lmtp; id 4QbX\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture(params=["memory", "postgresql"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[MailStore]:
    backend: MailStore
    if request.param == "memory":
        backend = MemoryStore(clock=clock, duplicate_window=DUPLICATE_WINDOW)
    else:
        backend = postgres_store(request.getfixturevalue("postgres_dsn"), clock)
    yield backend
    await backend.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_the_same_delivery_again_is_stored_once(store: MailStore) -> None:
    deliverer = Deliverer(make_config(), store, users("alice", "bob"))
    first = await deliverer.deliver("alice@example.test", "s@example.net", MESSAGE)
    again = await deliverer.deliver("alice@example.test", "s@example.net", MESSAGE)
    assert again.key == first.key
    assert (await store.usage("alice")).messages == 1
    # Another recipient of the same message, and another message, are new deliveries.
    await deliverer.deliver("bob@example.test", "s@example.net", MESSAGE)
    await deliverer.deliver("alice@example.test", "s@example.net", MESSAGE + b"P.S.\r\n")
    assert (await store.usage("bob")).messages == 1
    assert (await store.usage("alice")).messages == 2


async def test_after_the_window_the_same_bytes_are_a_new_message(
    store: MailStore, clock: FakeClock
) -> None:
    deliverer = Deliverer(make_config(), store, users("alice"))
    await deliverer.deliver("alice@example.test", "s@example.net", MESSAGE)
    clock.advance(seconds=DUPLICATE_WINDOW + 1)
    await deliverer.deliver("alice@example.test", "s@example.net", MESSAGE)
    assert (await store.usage("alice")).messages == 2


def test_the_id_is_of_the_message_as_received_per_user_and_folder() -> None:
    ids = {
        delivery_id("alice", "INBOX", MESSAGE),
        delivery_id("bob", "INBOX", MESSAGE),
        delivery_id("alice", "Work", MESSAGE),
        delivery_id("alice", "INBOX", MESSAGE + b"\r\n"),
        delivery_id("aliceINBOX", "", MESSAGE),
    }
    assert len(ids) == 5
    assert delivery_id("alice", "INBOX", MESSAGE) == delivery_id("alice", "INBOX", MESSAGE)


def test_an_lmtp_retry_of_the_same_data_leaves_one_copy(
    start_lmtp: StartLmtp, postgres_dsn: str
) -> None:
    store = postgres_store(postgres_dsn)
    server = start_lmtp(store=store)
    try:
        for _ in range(2):  # the MTA never saw the first 250, and sends it again
            with smtplib.LMTP(server.host, server.port, timeout=10) as client:
                client.ehlo("mta.example.net")
                client.mail("s@example.net")
                assert client.rcpt("alice@example.test")[0] == 250
                assert client.data(MESSAGE)[0] == 250
        assert len(server.messages("alice")) == 1
    finally:
        server.run(store.close())
