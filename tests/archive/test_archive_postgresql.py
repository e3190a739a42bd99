"""The PostgreSQL archive beyond the contract: content stored once and counted right
across users and nodes, even when they add and delete the same content at once;
large messages read a piece at a time; another user's ids reach nothing; a text too
large for a tsvector still kept; batches all or nothing; reindex from the stored
messages; a damaged piece is an error, never wrong octets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import string
import tracemalloc
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from popbox.archive.base import ArchiveSource, MatchAll
from popbox.archive.extract import extract
from popbox.archive.postgresql import PostgresArchive
from popbox.archive.postgresql_query import fold
from popbox.archive.postgresql_schema import DIGEST_SIZE, PIECE_SIZE
from popbox.archive.query import parse_query
from popbox.backends import build_archive, build_store
from popbox.config import Config
from popbox.delivery.deliverer import Deliverer
from popbox.errors import ArchiveError, EntryOnHold, NoSuchEntry
from support.lmtp import users
from support.pgarchive import mail, postgres_archive

KEPT = ArchiveSource.DELIVERED
# Memory one add or read of a large message may take: a few pieces and their frames.
BOUND = 8 * 1024 * 1024


@pytest.fixture
async def archive(postgres_dsn: str) -> AsyncIterator[PostgresArchive]:
    archive = postgres_archive(postgres_dsn)
    yield archive
    await archive.close()


async def read_all(archive: PostgresArchive, user: str, entry_id: int) -> bytes:
    return b"".join([chunk async for chunk in archive.read(user, entry_id)])


async def stored(pool: AsyncConnectionPool, sql: str) -> list[tuple[object, ...]]:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql.encode())
        return list(await cursor.fetchall())


async def assert_counted(archive: PostgresArchive) -> None:
    """Every count is what it counts: a message's refs its entries, a piece's refs
    the messages that use it; nothing is stored that nothing uses."""
    pool = await archive.pool()
    messages = await stored(
        pool,
        "SELECT m.digest, m.refs, (SELECT count(*) FROM archive_entries e "
        "WHERE e.digest = m.digest), m.pieces FROM archive_messages m",
    )
    uses: dict[bytes, int] = {}
    for digest, refs, entries, pieces in messages:
        assert refs == entries > 0, bytes(digest).hex()  # type: ignore[arg-type]
        data = bytes(pieces)  # type: ignore[arg-type]
        for piece in {data[at : at + DIGEST_SIZE] for at in range(0, len(data), DIGEST_SIZE)}:
            uses[piece] = uses.get(piece, 0) + 1
    objects = await stored(pool, "SELECT digest, refs FROM archive_objects")
    assert {bytes(digest): refs for digest, refs in objects} == uses  # type: ignore[arg-type]


async def test_a_message_kept_by_many_users_is_stored_once_and_freed_with_the_last(
    archive: PostgresArchive,
) -> None:
    data = mail(subject="for everyone")
    ids = {}
    for user in ("alice", "bob", "carol"):
        ids[user] = (await archive.add(user, data, source=KEPT)).entry.id
    pool = await archive.pool()
    assert await stored(pool, "SELECT refs FROM archive_messages") == [(3,)]
    await assert_counted(archive)
    assert await archive.delete("alice", [ids["alice"]]) == 1
    assert await read_all(archive, "bob", ids["bob"]) == data
    await assert_counted(archive)
    await archive.delete("bob", [ids["bob"]])
    await archive.expire("carol", 0, now=4e9)
    assert await stored(pool, "SELECT count(*) FROM archive_messages") == [(0,)]
    assert await stored(pool, "SELECT count(*) FROM archive_objects") == [(0,)]


async def test_an_attachment_two_messages_share_is_stored_once(archive: PostgresArchive) -> None:
    report = os.urandom(300_000)
    one = mail(subject="first", body="one", attachments={"report.bin": report})
    two = mail(subject="second", body="two", attachments={"report.bin": report})
    await archive.add("alice", one, source=KEPT)
    await archive.add("bob", two, source=KEPT)
    pool = await archive.pool()
    [(shared,)] = await stored(pool, "SELECT count(*) FROM archive_objects WHERE refs = 2")
    [(octets,)] = await stored(pool, "SELECT sum(size) FROM archive_objects")
    assert shared >= 1
    assert octets < len(one) + len(two) - 300_000  # the attachment once, not twice
    await assert_counted(archive)


async def test_a_large_message_is_read_back_exactly_a_piece_at_a_time(
    archive: PostgresArchive, tmp_path: Path
) -> None:
    data = mail(attachments={"big.bin": os.urandom(5 * 1024 * 1024)})
    path = tmp_path / "big.eml"
    path.write_bytes(data)
    added = await archive.add("alice", path, source=ArchiveSource.IMPORTED)
    assert added.entry.size == len(data)
    chunks = [chunk async for chunk in archive.read("alice", added.entry.id)]
    assert b"".join(chunks) == data
    assert len(chunks) > len(data) // PIECE_SIZE
    assert max(len(chunk) for chunk in chunks) <= PIECE_SIZE


async def test_a_large_message_is_added_and_read_in_bounded_memory(
    archive: PostgresArchive, tmp_path: Path
) -> None:
    """A 20 MB message from a file costs a few pieces of memory, not 20 MB (Python's
    own allocations, which a copy of the message would be)."""
    path = tmp_path / "big.eml"
    path.write_bytes(mail(attachments={"big.bin": os.urandom(20 * 1024 * 1024)}))
    await archive.add("warm", mail(), source=KEPT)  # the pool and the tables exist
    tracemalloc.start()
    try:
        added = await archive.add("alice", path, source=ArchiveSource.IMPORTED)
        adding = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        octets = 0
        async for chunk in archive.read("alice", added.entry.id):
            octets += len(chunk)
        reading = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert octets == path.stat().st_size
    assert adding < BOUND
    assert reading < BOUND


async def test_a_message_deleted_while_it_is_read_ends_the_read_with_no_such_entry(
    archive: PostgresArchive,
) -> None:
    data = mail(attachments={"big.bin": os.urandom(3 * 1024 * 1024)})
    added = await archive.add("alice", data, source=KEPT)
    reader = archive.read("alice", added.entry.id)
    assert data.startswith(await anext(reader))
    assert await archive.delete("alice", [added.entry.id]) == 1
    with pytest.raises(NoSuchEntry):
        async for _ in reader:
            pass


async def test_a_cancelled_add_keeps_nothing_and_the_archive_goes_on(
    archive: PostgresArchive, tmp_path: Path
) -> None:
    """A client gone mid-upload cancels the add at any point: before, during or
    after the worker's reading, or inside the transaction."""
    path = tmp_path / "big.eml"
    data = mail(attachments={"big.bin": os.urandom(4 * 1024 * 1024)})
    path.write_bytes(data)
    await archive.pool()
    for delay in (0, 0.001, 0.01, 0.05, 0.1):
        task = asyncio.create_task(archive.add("alice", path, source=KEPT))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Cancelled before its COMMIT reached the database, or after: either nothing
        # was kept, or all of it (undone for the next round).
        kept = [entry async for entry in archive.entries("alice", MatchAll())]
        assert len(kept) <= 1
        for entry in kept:
            assert await read_all(archive, "alice", entry.id) == data
        await archive.delete("alice", [entry.id for entry in kept])
        assert await archive.users() == []
        await assert_counted(archive)
    added = await archive.add("alice", path, source=KEPT)
    assert await read_all(archive, "alice", added.entry.id) == data


async def test_two_nodes_adding_the_same_messages_at_once_store_each_once(
    postgres_dsn: str,
) -> None:
    nodes = [postgres_archive(postgres_dsn) for _ in range(2)]
    try:
        shared = os.urandom(200_000)
        messages = [
            mail(subject=f"message {i}", attachments={"shared.bin": shared}) for i in range(3)
        ]
        await asyncio.gather(*(node.pool() for node in nodes))
        tries = [
            nodes[i % 2].add(user, data, source=KEPT)
            for i in range(4)
            for user in ("alice", "bob")
            for data in messages
        ]
        results = await asyncio.gather(*tries)
        for user in ("alice", "bob"):
            mine = [added for added in results if added.entry.user == user]
            assert sum(added.new for added in mine) == len(messages)
            assert len({added.entry.id for added in mine}) == len(messages)
        await assert_counted(nodes[0])
        pool = await nodes[0].pool()
        assert await stored(pool, "SELECT count(*) FROM archive_messages") == [(3,)]
    finally:
        for node in nodes:
            await node.close()


async def test_adding_and_deleting_the_same_message_at_once_keeps_the_counts(
    postgres_dsn: str,
) -> None:
    nodes = [postgres_archive(postgres_dsn) for _ in range(2)]
    try:
        data = mail(attachments={"a.bin": os.urandom(100_000)})
        for _ in range(6):
            first = await nodes[0].add("alice", data, source=KEPT)
            added, _ = await asyncio.gather(
                nodes[1].add("bob", data, source=KEPT),
                nodes[0].delete("alice", [first.entry.id]),
            )
            await assert_counted(nodes[0])
            assert await read_all(nodes[1], "bob", added.entry.id) == data
            await nodes[1].delete("bob", [added.entry.id])
        pool = await nodes[0].pool()
        assert await stored(pool, "SELECT count(*) FROM archive_objects") == [(0,)]
    finally:
        for node in nodes:
            await node.close()


async def test_many_nodes_adding_and_deleting_shared_content_at_once_keep_the_counts(
    postgres_dsn: str,
) -> None:
    """Three nodes, four users, messages that share attachments, adds and deletes all
    at once: every call succeeds and every count is right afterwards."""
    nodes = [postgres_archive(postgres_dsn) for _ in range(3)]
    try:
        files = [os.urandom(150_000) for _ in range(2)]
        messages = [
            mail(subject=f"m{i}", attachments={"a.bin": files[i % 2], "b.bin": files[0]})
            for i in range(5)
        ]
        users = ["alice", "bob", "carol", "dave"]
        rng = random.Random(7)
        for _ in range(3):

            async def work(i: int) -> None:
                node = nodes[i % len(nodes)]
                user = rng.choice(users)
                if rng.random() < 0.6:
                    await node.add(user, rng.choice(messages), source=KEPT)
                    return
                mine = [entry.id async for entry in node.entries(user, MatchAll())]
                await node.delete(user, rng.sample(mine, k=min(len(mine), 2)))

            await asyncio.gather(*(work(i) for i in range(40)))
            await assert_counted(nodes[0])
        for user in users:
            for entry in [entry async for entry in nodes[1].entries(user, MatchAll())]:
                assert await read_all(nodes[2], user, entry.id) in messages
    finally:
        for node in nodes:
            await node.close()


async def test_another_users_id_reaches_nothing(archive: PostgresArchive) -> None:
    """Bob names Alice's entry: he cannot see, read, hold, delete or find it."""
    alice = (await archive.add("alice", mail(subject="private"), source=KEPT)).entry
    await archive.add("bob", mail(subject="his own"), source=KEPT)
    for entry_id in (alice.id, alice.id + 1000):
        with pytest.raises(NoSuchEntry):
            await archive.entry("bob", entry_id)
        with pytest.raises(NoSuchEntry):
            await read_all(archive, "bob", entry_id)
    assert await archive.set_hold("bob", [alice.id], True) == 0
    assert await archive.delete("bob", [alice.id]) == 0
    assert await archive.entry("alice", alice.id) == alice
    page = await archive.search("bob", parse_query("private"))
    assert (page.total, page.hits) == (0, ())
    assert [entry.subject async for entry in archive.entries("bob", MatchAll())] == ["his own"]


async def test_a_held_entry_outlives_delete_and_expiry(archive: PostgresArchive) -> None:
    old = (await archive.add("alice", mail(subject="old"), source=KEPT, received=1e9)).entry
    other = (await archive.add("alice", mail(subject="other"), source=KEPT, received=1e9)).entry
    assert await archive.set_hold("alice", [old.id], True) == 1
    assert await archive.set_hold("alice", [old.id], True) == 0
    with pytest.raises(EntryOnHold):
        await archive.delete("alice", [other.id, old.id])
    assert (await archive.entry("alice", other.id)).id == other.id  # none went
    assert await archive.expire("alice", 30, now=2e9) == 1
    assert (await archive.entry("alice", old.id)).hold
    assert [usage.held for usage in await archive.users()] == [1]
    assert await archive.set_hold("alice", None, False) == 1
    assert await archive.expire("alice", 30, now=2e9) == 1
    assert await archive.users() == []


def _distinct_words(count: int, seed: int = 1) -> list[str]:
    """Words of eight letters, seeded: letters only, since PostgreSQL's parser reads a
    word such as ``1e5a0b3c`` as a number and a word, which is not what these tests
    are about."""
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=8)) for _ in range(count)]


async def test_a_text_too_large_for_a_tsvector_is_kept_and_its_start_found(
    archive: PostgresArchive,
) -> None:
    """Distinct words enough to pass PostgreSQL's 1 MB tsvector limit (two text parts
    of half a megabyte): the message is kept byte-exact and as much of its text as
    fits is searchable."""
    words = _distinct_words(100_000)
    halves = ["firstword " + " ".join(words[:50_000]), " ".join(words[50_000:])]
    message = EmailMessage()
    message["Subject"] = "many words"
    message.set_content(halves[0])
    message.add_attachment(halves[1], subtype="plain", disposition="inline")
    data = bytes(message)
    pool = await archive.pool()
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):  # what the test is about
        await stored(pool, "SELECT to_tsvector('simple', '" + " ".join(halves) + "')")
    added = await archive.add("alice", data, source=KEPT)
    assert await read_all(archive, "alice", added.entry.id) == data
    assert (await archive.search("alice", parse_query("firstword"))).total == 1
    assert (await archive.search("alice", parse_query(words[10]))).total == 1
    assert (await archive.search("alice", parse_query(words[-1]))).total == 0  # past the cut


async def test_attachment_names_too_many_for_a_tsvector_are_cut_too(
    archive: PostgresArchive,
) -> None:
    """Two hundred attachments with names of 2,000 characters of distinct words, on
    top of a long text: both are cut until the tsvector fits."""
    message = EmailMessage()
    message["Subject"] = "many names"
    message.set_content(" ".join(_distinct_words(70_000, seed=2)))
    name_words = _distinct_words(222 * 200, seed=3)
    names = [" ".join(name_words[i * 222 : (i + 1) * 222]) for i in range(200)]
    for name in names:
        message.add_attachment(b"x", maintype="application", subtype="octet-stream", filename=name)
    data = bytes(message)
    found = extract(data)
    pool = await archive.pool()
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):  # what the test is about
        async with pool.connection() as conn:
            await conn.execute(
                "SELECT to_tsvector('simple', %s)",
                (fold(found.body + " " + " ".join(found.attachments)),),
            )
    added = await archive.add("alice", data, source=KEPT)
    assert len(added.entry.attachments) == len(names)
    assert await read_all(archive, "alice", added.entry.id) == data
    first = names[0].split()[0]
    assert (await archive.search("alice", parse_query(f"filename:{first}"))).total == 1


async def test_a_batch_is_kept_all_together_or_not_at_all(
    archive: PostgresArchive, tmp_path: Path
) -> None:
    good = [mail(subject=f"batch {i}") for i in range(3)]
    with pytest.raises(ArchiveError):
        await archive.add_batch(
            "alice", [*good, tmp_path / "missing.eml"], source=ArchiveSource.IMPORTED
        )
    assert await archive.users() == []
    added = await archive.add_batch("alice", [*good, good[0]], source=ArchiveSource.IMPORTED)
    assert [item.new for item in added] == [True, True, True, False]
    assert added[3].entry == added[0].entry
    await assert_counted(archive)


async def test_origins_are_remembered_even_for_a_message_kept_already(
    archive: PostgresArchive,
) -> None:
    data = mail()
    await archive.add("alice", data, source=KEPT)
    again = await archive.add("alice", data, source=KEPT, origin="Archive/u1")
    assert not again.new
    assert await archive.known_origins("alice", ["Archive/u1", "Archive/u2"]) == {"Archive/u1"}
    assert await archive.known_origins("bob", ["Archive/u1"]) == set()


async def test_reindex_rebuilds_the_search_from_the_stored_messages(
    archive: PostgresArchive,
) -> None:
    for user in ("alice", "bob"):
        await archive.add(user, mail(subject="rebuilt subject", body="findable"), source=KEPT)
    pool = await archive.pool()
    async with pool.connection() as conn:
        await conn.execute("UPDATE archive_entries SET words = '', people = '', subject = ''")
    assert (await archive.search("alice", parse_query("findable"))).total == 0
    assert await archive.reindex("alice") == 1
    page = await archive.search("alice", parse_query("subject:rebuilt"))
    assert [hit.entry.subject for hit in page.hits] == ["rebuilt subject"]
    assert (await archive.search("bob", parse_query("findable"))).total == 0
    assert await archive.reindex() == 2
    assert (await archive.search("bob", parse_query("findable"))).total == 1


async def test_a_damaged_piece_is_an_archive_error_not_wrong_octets(
    archive: PostgresArchive,
) -> None:
    added = await archive.add("alice", mail(body="intact"), source=KEPT)
    pool = await archive.pool()
    async with pool.connection() as conn:
        # One octet in the middle of each stored frame flipped.
        await conn.execute(
            "UPDATE archive_objects SET data = set_byte(data, length(data) / 2, "
            "get_byte(data, length(data) / 2) # 255)"
        )
    with pytest.raises(ArchiveError, match="damaged"):
        await read_all(archive, "alice", added.entry.id)


async def test_a_cluster_delivery_keeps_its_copy_in_the_same_database(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The composition root's archive for ``storage.backend = "postgresql"``: what a
    delivery keeps, any node's archive finds."""
    config = Config(
        data_dir=tmp_path,
        storage={"backend": "postgresql"},
        postgresql={"dsn": postgres_dsn, "pool_max": 2},
        archive={"keep": ["delivered"]},
    )
    archive = build_archive(config)
    assert isinstance(archive, PostgresArchive)
    passdb = users("alice")
    store = build_store(config, passdb)
    other_node = build_archive(config)
    try:
        deliverer = Deliverer(config, store, passdb, archive)
        await deliverer.deliver("alice", "carol@example.com", mail(subject="kept twice"))
        page = await other_node.search("alice", parse_query("subject:kept"))
        assert [hit.entry.source for hit in page.hits] == [ArchiveSource.DELIVERED]
    finally:
        for closing in (archive, other_node, store):
            await closing.close()
