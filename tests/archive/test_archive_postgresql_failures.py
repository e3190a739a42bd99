"""The PostgreSQL archive when its database fails: stopped while in use, crashed
right after an add returned, then started again.

What a user would notice: every call fails with ArchiveError (the web page's "try
again", the CLI's message), never a driver exception or a traceback; what an add
returned for survives; and the same archive serves again once the database is back,
without a restart of popbox.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest

from popbox.archive.base import ArchiveSource, MatchAll
from popbox.archive.postgresql import PostgresArchive
from popbox.archive.query import parse_query
from popbox.errors import ArchiveError
from support.pgarchive import mail, postgres_archive
from support.postgres import PostgresServer

KEPT = ArchiveSource.DELIVERED


@pytest.fixture
async def down_and_up(
    private_postgres: PostgresServer,
) -> AsyncIterator[tuple[PostgresServer, PostgresArchive]]:
    """An archive on a database of its own cluster, which the test stops and starts."""
    dsn = await asyncio.to_thread(private_postgres.create_database)
    archive = postgres_archive(dsn, pool_timeout=2.0)
    yield private_postgres, archive
    await archive.close()


async def read_all(archive: PostgresArchive, user: str, entry_id: int) -> bytes:
    return b"".join([chunk async for chunk in archive.read(user, entry_id)])


async def test_a_database_stopped_in_use_is_an_archive_error_and_then_serves_again(
    down_and_up: tuple[PostgresServer, PostgresArchive],
) -> None:
    server, archive = down_and_up
    data = mail(subject="kept before", body="survives")
    kept = (await archive.add("alice", data, source=KEPT)).entry

    await asyncio.to_thread(server.stop)

    async def entries() -> None:
        async for _ in archive.entries("alice", MatchAll()):
            pass

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: archive.add("alice", mail(subject="while down"), source=KEPT),
        lambda: archive.add_batch("alice", [mail(subject="batch")], source=KEPT),
        lambda: archive.search("alice", parse_query("survives")),
        lambda: archive.search("alice", MatchAll()),
        entries,
        lambda: archive.entry("alice", kept.id),
        lambda: read_all(archive, "alice", kept.id),
        lambda: archive.known_origins("alice", ["Archive/1"]),
        lambda: archive.set_hold("alice", [kept.id], True),
        lambda: archive.delete("alice", [kept.id]),
        lambda: archive.expire("alice", 1, now=4e9),
        archive.users,
        archive.reindex,
    ]
    for call in calls:
        with pytest.raises(ArchiveError) as caught:
            await call()
        # The driver's error (or the pool's timeout) is kept as the cause, for the log.
        assert isinstance(caught.value.__cause__, psycopg.Error)

    await asyncio.to_thread(server.start)
    assert await archive.entry("alice", kept.id) == kept  # nothing was held or deleted
    assert await read_all(archive, "alice", kept.id) == data
    page = await archive.search("alice", MatchAll())
    assert [hit.entry.subject for hit in page.hits] == ["kept before"]
    assert (await archive.add("alice", mail(subject="after"), source=KEPT)).new


async def test_a_database_stopped_mid_read_is_an_archive_error(
    down_and_up: tuple[PostgresServer, PostgresArchive],
) -> None:
    server, archive = down_and_up
    data = mail(attachments={"big.bin": os.urandom(4 * 1024 * 1024)})
    added = await archive.add("alice", data, source=KEPT)
    reader = archive.read("alice", added.entry.id)
    first = await anext(reader)
    assert data.startswith(first)
    await asyncio.to_thread(server.stop)
    with pytest.raises(ArchiveError):
        async for _ in reader:
            pass
    await asyncio.to_thread(server.start)
    assert await read_all(archive, "alice", added.entry.id) == data


async def test_what_an_add_returned_for_survives_a_database_crash(
    down_and_up: tuple[PostgresServer, PostgresArchive],
) -> None:
    server, archive = down_and_up
    data = mail(subject="committed", attachments={"a.bin": os.urandom(500_000)})
    added = await archive.add("alice", data, source=KEPT, origin="Archive/7")
    await asyncio.to_thread(server.stop, "immediate")  # no shutdown checkpoint
    await asyncio.to_thread(server.start)
    assert await archive.entry("alice", added.entry.id) == added.entry
    assert await read_all(archive, "alice", added.entry.id) == data
    assert await archive.known_origins("alice", ["Archive/7"]) == {"Archive/7"}
    assert (await archive.search("alice", parse_query("subject:committed"))).total == 1
