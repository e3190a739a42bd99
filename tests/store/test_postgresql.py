"""What only the PostgreSQL store has: leases shared by nodes, fenced commits, big
bodies in chunks, delivery ids, counters, folder images (the contract suites cover
the rest, conftest.py's ``store`` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import AsyncIterator

import psycopg
import pytest

from popbox.errors import MaildropInUse, NoSuchFolder, StoreError
from popbox.store import Usage
from popbox.store.image import ImageStore, own_uidl
from popbox.store.mailbox import MailboxView
from popbox.store.postgresql import PostgresStore
from popbox.store.postgresql_maildrop import PostgresMaildrop
from popbox.store.postgresql_schema import CHUNK_SIZE
from popbox.wireform import wire_size
from support.clock import FakeClock
from support.maildrop import read_all, stored_messages
from support.pgstore import postgres_store
from support.postgres import PostgresServer


@pytest.fixture
async def pg(postgres_dsn: str, clock: FakeClock) -> AsyncIterator[PostgresStore]:
    store = postgres_store(postgres_dsn, clock)
    yield store
    await store.close()


async def open_when_free(store: PostgresStore, user: str) -> PostgresMaildrop:
    """Open once the lease a dead node left has run out."""
    for _ in range(400):
        try:
            return await store.open_maildrop(user)
        except MaildropInUse:
            await asyncio.sleep(0.05)
    raise AssertionError("the lease never ran out")


async def test_a_second_node_gets_in_use_and_sees_who_holds_it(
    postgres_dsn: str, clock: FakeClock, pg: PostgresStore
) -> None:
    other = postgres_store(postgres_dsn, clock)
    try:
        await pg.deliver("alice", b"one\n")
        held = await pg.open_maildrop("alice")
        with pytest.raises(MaildropInUse, match="held by test"):
            await other.open_maildrop("alice")
        await held.release()
        again = await other.open_maildrop("alice")
        assert len(again.messages) == 1
        await again.release()
    finally:
        await other.close()


async def test_the_lease_of_a_dead_node_is_taken_over_once_it_runs_out(
    postgres_dsn: str, pg: PostgresStore
) -> None:
    await pg.deliver("alice", b"one\n")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO mail_leases VALUES ('alice', 'INBOX', 'dead-node', 'x', "
            "clock_timestamp() + interval '1 second')"
        )
    with pytest.raises(MaildropInUse, match="dead-node"):
        await pg.open_maildrop("alice")
    maildrop = await open_when_free(pg, "alice")
    await maildrop.commit_deletions([0])
    assert await pg.usage("alice") == Usage(0, 0)


async def test_a_session_keeps_its_lease_past_its_length_by_renewing_it(
    postgres_dsn: str, clock: FakeClock
) -> None:
    store = postgres_store(postgres_dsn, clock, lease_seconds=1.0)
    other = postgres_store(postgres_dsn, clock, lease_seconds=1.0)
    try:
        await store.deliver("alice", b"one\n")
        held = await store.open_maildrop("alice")
        await asyncio.sleep(2.5)  # two and a half leases
        with pytest.raises(MaildropInUse):
            await other.open_maildrop("alice")
        await held.commit_deletions([0])
        assert await other.usage("alice") == Usage(0, 0)
    finally:
        await store.close()
        await other.close()


async def test_a_commit_whose_lease_was_lost_deletes_nothing(
    postgres_dsn: str, pg: PostgresStore
) -> None:
    await pg.deliver("alice", b"one\n")
    maildrop = await pg.open_maildrop("alice")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        # Another node took it over (the lease ran out while this node was paused).
        conn.execute("UPDATE mail_leases SET session = 'someone-else', node = 'other'")
    with pytest.raises(StoreError, match="ran out"):
        await maildrop.commit_deletions([0])
    assert await pg.usage("alice") == Usage(1, wire_size(b"one\n"))


async def test_a_big_body_is_stored_and_read_in_chunks(pg: PostgresStore) -> None:
    big = b"0123456789abcdef\r\n" * 200_000  # 3.6 MB
    await pg.deliver("alice", big)
    with io.BytesIO(big) as source:
        await pg.deliver_file("alice", source)
    maildrop = await pg.open_maildrop("alice")
    assert [info.size for info in maildrop.messages] == [len(big), len(big)]
    for index in range(2):
        chunks = [chunk async for chunk in maildrop.read_message(index)]
        assert max(map(len, chunks)) <= CHUNK_SIZE
        assert b"".join(chunks) == big
    await maildrop.release()
    assert await pg.usage("alice") == Usage(2, 2 * len(big))


async def test_an_empty_message_is_a_message(pg: PostgresStore) -> None:
    await pg.deliver("alice", b"")
    assert await stored_messages(pg, "alice") == [b""]


async def test_a_delivery_id_seen_within_the_window_stores_nothing(
    pg: PostgresStore, clock: FakeClock
) -> None:
    first = await pg.deliver("alice", b"one\n", delivery_id="d1")
    assert await pg.deliver("alice", b"one\n", delivery_id="d1") == first
    big = b"x" * (3 * CHUNK_SIZE)
    key = await pg.deliver("alice", big, delivery_id="d2")
    assert await pg.deliver("alice", big, delivery_id="d2") == key
    assert await pg.deliver("bob", b"one\n", delivery_id="d1") != ""  # per user
    assert (await pg.usage("alice")).messages == 2
    clock.advance(days=6)  # past the window: the same id is a new delivery
    assert await pg.deliver("alice", b"one\n", delivery_id="d1") != first
    assert (await pg.usage("alice")).messages == 3


async def test_uidls_are_popbox_own_form_shared_with_maildir(pg: PostgresStore) -> None:
    await pg.deliver("alice", b"one\n")
    await pg.deliver("alice", b"two\n", uidl="KEPT-1")
    maildrop = await pg.open_maildrop("alice")
    uidl, kept = maildrop.messages.uidls
    await maildrop.release()
    image = await pg.open_image("alice", "INBOX")
    await image.close()
    assert uidl == own_uidl(image.image.uidvalidity, image.image.messages[0].uid)
    assert kept == "KEPT-1"


async def test_a_folder_image_moves_whole_and_a_restore_resumes(
    postgres_server: PostgresServer, clock: FakeClock, pg: PostgresStore
) -> None:
    for n in range(3):
        await pg.deliver("alice", f"message {n}\n".encode(), uidl="K1" if n == 1 else None)
    await pg.deliver("alice", b"big\n" * CHUNK_SIZE)
    phone = MailboxView(device="phone")
    await listing(pg, "alice", MailboxView(device="laptop"))  # a second holding device
    maildrop = await pg.open_maildrop("alice", phone)
    await maildrop.commit_deletions([0])  # the phone's deletion, kept in the state
    before = await stored_messages(pg, "alice")
    seen = await listing(pg, "alice", phone)

    source = await pg.open_image("alice", "INBOX")
    with pytest.raises(MaildropInUse):
        await pg.open_maildrop("alice")
    target = postgres_store(postgres_server.create_database(), clock)
    try:
        images: ImageStore = target
        # A restore killed after its first message, then run again.
        partial = dataclasses.replace(source.image, messages=source.image.messages[:1])
        assert (await images.restore_image(partial, source.read)).copied == 1
        report = await images.restore_image(source.image, source.read)
        assert (report.copied, report.skipped, report.removed) == (3, 1, 0)
        assert await stored_messages(target, "alice") == before
        assert len(seen) == 3
        assert await listing(target, "alice", phone) == seen
        assert await target.usage("alice") == await pg.usage("alice")
        await target.deliver("alice", b"after the move\n")
        [*_, last] = await listing(target, "alice", phone)
        assert last[0] == own_uidl(source.image.uidvalidity, source.image.next_uid)
    finally:
        await source.close()
        await target.close()
    await pg.remove_folder("alice", "INBOX")
    assert await pg.usage("alice") == Usage(0, 0)
    with pytest.raises(NoSuchFolder):
        await pg.open_image("alice", "INBOX")


async def listing(store: PostgresStore, user: str, view: MailboxView) -> list[tuple[str, bytes]]:
    maildrop = await store.open_maildrop(user, view)
    try:
        return [
            (maildrop.messages[i].uidl, await read_all(maildrop, i))
            for i in range(len(maildrop.messages))
        ]
    finally:
        await maildrop.release()
