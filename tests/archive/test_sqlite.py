"""The embedded archive's own promises (popbox.archive.sqlite) beyond the contract:
content stored once, object files and their cleanup, bounded memory for huge
messages, several archives (processes) on one directory, and the per-user index."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
from archive_helpers import message
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.archive.base import ArchiveSource, MatchAll, Term, TermField
from popbox.archive.fts import compile_query
from popbox.archive.query import parse_query
from popbox.archive.sqlite import BATCH_MESSAGES, INDEX_FILE, SqliteArchive
from popbox.archive.sqlite_index import INLINE_BELOW
from popbox.errors import ArchiveError, InvalidQuery

DELIVERED = ArchiveSource.DELIVERED


def with_attachment(text: str, payload: bytes, name: str = "data.bin") -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: carol@example.org\r\nTo: alice@example.com\r\nSubject: " + text.encode() +
        b'\r\nContent-Type: multipart/mixed; boundary="' + text.encode() + b'-b"\r\n\r\n'
        b"--" + text.encode() + b"-b\r\nContent-Type: text/plain\r\n\r\n" + text.encode() +
        b"\r\n--" + text.encode() + b"-b\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded +
        b"--" + text.encode() + b"-b--\r\n"
    )  # fmt: skip


def object_files(root: Path) -> list[Path]:
    return sorted((root / "objects").glob("*/*.zst"))


def table_count(root: Path, table: str) -> int:
    with sqlite3.connect(root / INDEX_FILE) as connection:
        return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def read_all(archive: SqliteArchive, user: str, entry_id: int) -> bytes:
    return b"".join([chunk async for chunk in archive.read(user, entry_id)])


async def test_a_shared_attachment_is_stored_once_and_freed_with_its_last_message(
    tmp_path: Path,
) -> None:
    root = tmp_path / "archive"
    archive = SqliteArchive(root)
    payload = os.urandom(3 * INLINE_BELOW)
    first = with_attachment("first", payload)
    second = with_attachment("second message", payload, "renamed.bin")
    one = await archive.add("alice", first, source=DELIVERED)
    two = await archive.add("bob", second, source=DELIVERED)
    three = await archive.add("bob", first, source=DELIVERED)
    assert len(object_files(root)) == 1
    assert table_count(root, "messages") == 2
    assert await read_all(archive, "bob", two.entry.id) == second
    await archive.delete("alice", [one.entry.id])
    await archive.delete("bob", [three.entry.id])
    assert len(object_files(root)) == 1
    assert await read_all(archive, "bob", two.entry.id) == second
    await archive.delete("bob", [two.entry.id])
    assert object_files(root) == []
    assert table_count(root, "objects") == 0
    assert table_count(root, "messages") == 0
    await archive.close()


async def test_reindex_removes_what_a_crash_left_behind(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive = SqliteArchive(root)
    kept = with_attachment("kept", os.urandom(2 * INLINE_BELOW))
    added = await archive.add("alice", kept, source=DELIVERED)
    (named,) = object_files(root)
    orphan = named.parent.parent / "ab" / ("ab" + "0" * 62 + ".zst")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by a crash between write and commit")
    temporary = named.parent / ".tmp-half-written"
    temporary.write_bytes(b"partial")
    assert await archive.reindex() == 1
    assert object_files(root) == [named]
    assert not temporary.exists()
    assert await read_all(archive, "alice", added.entry.id) == kept
    await archive.close()


async def test_a_50_mb_message_costs_bounded_memory(tmp_path: Path) -> None:
    """Adding from a file maps it; reading streams it: neither holds the message."""
    size = 50 * 1024 * 1024
    path = tmp_path / "big.eml"
    chunk = os.urandom(1024 * 1024)
    with path.open("wb") as file:
        file.write(with_attachment("big", b"")[:-9])
        for _ in range(size // len(chunk)):
            file.write(base64.encodebytes(chunk))
        file.write(b"--big-b--\r\n")
    archive = SqliteArchive(tmp_path / "archive")
    tracemalloc.start()
    try:
        added = await archive.add("alice", path, source=ArchiveSource.IMPORTED)
        _, peak_add = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        biggest = 0
        async for piece in archive.read("alice", added.entry.id):
            total += len(piece)
            biggest = max(biggest, len(piece))
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == path.stat().st_size
    assert added.entry.attachments == ("data.bin",)
    assert peak_add < 24 * 1024 * 1024
    assert peak_read < 8 * 1024 * 1024
    assert biggest <= 1024 * 1024
    await archive.close()


async def test_two_archives_on_one_directory_write_at_once(tmp_path: Path) -> None:
    """As the server's workers and the CLI do: each sees what the other added."""
    root = tmp_path / "archive"
    first, second = SqliteArchive(root), SqliteArchive(root)
    shared = os.urandom(2 * INLINE_BELOW)

    async def fill(archive: SqliteArchive, name: str) -> list[int]:
        out = []
        for index in range(15):
            data = with_attachment(f"{name}{index}", shared)
            out.append((await archive.add("alice", data, source=DELIVERED)).entry.id)
        return out

    ids_one, ids_two = await asyncio.gather(fill(first, "one"), fill(second, "two"))
    assert len(set(ids_one) | set(ids_two)) == 30
    assert (await first.search("alice", MatchAll())).total == 30
    assert (await second.search("alice", parse_query("one7"))).total == 1
    assert len(object_files(root)) == 1
    await first.close()
    await second.close()


async def test_a_users_search_is_driven_by_their_own_postings(tmp_path: Path) -> None:
    """Every MATCH starts with the user's owner token, and the plan walks the FTS5
    index first, then entries by id: never every entry, never another user's rows."""
    archive = SqliteArchive(tmp_path / "archive")
    await archive.add("alice", message("a", "word"), source=DELIVERED)
    await archive.add("bob", message("b", "word"), source=DELIVERED)
    compiled = compile_query(Term(TermField.ANY, "word"), 2)
    assert compiled.match is not None
    assert compiled.match.startswith('owner : "owner2" AND ')
    with sqlite3.connect(tmp_path / "archive" / INDEX_FILE) as connection:
        plan = " | ".join(
            row[3]
            for row in connection.execute(
                "EXPLAIN QUERY PLAN SELECT e.id FROM text CROSS JOIN entries e "
                "ON e.id = text.rowid WHERE text MATCH ? AND e.user_id = ?",
                (compiled.match, 2),
            )
        )
    assert plan.startswith("SCAN text VIRTUAL TABLE INDEX")
    assert "SEARCH e USING INTEGER PRIMARY KEY" in plan
    hits = (await archive.search("bob", parse_query("word"))).hits
    assert [hit.entry.user for hit in hits] == ["bob"]
    await archive.close()


async def test_fts5_column_filter_injection_is_quoted_away() -> None:
    """A term that spells FTS5 syntax (a column filter on owner, a star, NEAR, a
    quote) compiles to quoted index words only."""
    compiled = compile_query(Term(TermField.ANY, 'x" OR owner : "owner1" * NEAR(a b)'), 7)
    assert compiled.match is not None
    user_part = compiled.match.removeprefix('owner : "owner7" AND ')
    assert user_part.count('"') == 2 * user_part.count(":")
    assert "owner1" in user_part  # only as a word to look for, inside quotes
    assert '"x" AND' in user_part or '"x"' in user_part
    assert "NEAR(" not in user_part
    assert " * " not in user_part.replace('" *', "")


async def test_small_messages_live_in_the_index_without_files(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive = SqliteArchive(root)
    added = await archive.add_batch(
        "alice", [message(f"m{index}", "x" * 100) for index in range(50)], source=DELIVERED
    )
    assert object_files(root) == []
    assert await read_all(archive, "alice", added[7].entry.id) == message("m7", "x" * 100)
    await archive.close()


QUERY_WORDS = st.sampled_from(
    [*'abc019 ()"-*:./\\', "OR", "AND", "NOT", "NEAR", "near", "from:", "to:", "subject:",
     "filename:", "has:attachment", "before:2026-01-01", "after:2026/7/3", "larger:1k",
     "smaller:2M", "owner", "{", "}", "^", "+", "ß", "\u0301", "\ufb01", "'"]
)  # fmt: skip


def test_any_query_that_parses_runs(tmp_path: Path) -> None:
    """Whatever the parser accepts compiles to SQL and FTS5 that SQLite accepts: an
    FTS5 syntax error would reach the user as a failed search."""
    loop = asyncio.new_event_loop()
    archive = SqliteArchive(tmp_path / "archive")
    try:
        loop.run_until_complete(
            archive.add("alice", with_attachment("abc near", b"\x00" * 100), source=DELIVERED)
        )

        @settings(max_examples=400, deadline=None)
        @given(
            st.one_of(
                st.lists(QUERY_WORDS, max_size=25).map(" ".join),
                st.lists(QUERY_WORDS, max_size=25).map("".join),
            )
        )
        def run(text: str) -> None:
            try:
                query = parse_query(text)
            except InvalidQuery:
                return
            loop.run_until_complete(archive.search("alice", query))
            loop.run_until_complete(archive.search("nobody", query))

        run()
    finally:
        loop.run_until_complete(archive.close())
        loop.close()


async def test_add_batch_is_one_transaction(tmp_path: Path) -> None:
    """A batch that fails part-way (its last file cannot be read, after a whole first
    part was written) leaves nothing behind: the import can simply run again."""
    root = tmp_path / "archive"
    archive = SqliteArchive(root)
    batch: list[bytes | Path] = [message(f"m{index}") for index in range(BATCH_MESSAGES + 5)]
    batch.append(with_attachment("big", os.urandom(2 * INLINE_BELOW)))
    batch.append(tmp_path / "missing.eml")
    with pytest.raises(ArchiveError, match=r"missing\.eml"):
        await archive.add_batch("alice", batch, source=ArchiveSource.IMPORTED)
    assert (await archive.search("alice", MatchAll())).total == 0
    assert table_count(root, "messages") == 0
    added = await archive.add_batch("alice", batch[:-1], source=ArchiveSource.IMPORTED)
    assert all(item.new for item in added)
    assert (await archive.search("alice", MatchAll())).total == len(batch) - 1
    await archive.close()


def test_a_short_prefix_is_never_expanded_over_the_whole_vocabulary() -> None:
    """A one-letter prefix would make FTS5 merge the postings of every word it
    begins, every user's, before the user's own rows are picked out."""
    short = compile_query(Term(TermField.ANY, "a*"), 1).match
    long = compile_query(Term(TermField.ANY, "abc*"), 1).match
    assert short is not None
    assert long is not None
    assert not short.endswith("*")
    assert long.endswith('"abc" *')
