"""The embedded archive's fast search paths: snippets found in Python (and FTS5's
own where they miss), pages of many matches walked newest first, has:attachment
by its partial index, and an older archive given that index when opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from archive_helpers import message

from popbox.archive.base import ArchiveSource, Snippet
from popbox.archive.query import parse_query
from popbox.archive.sqlite import INDEX_FILE, SqliteArchive
from popbox.archive.sqlite_index import TIME_WALK_FROM
from popbox.archive.sqlite_snippets import column_patterns, passage

DELIVERED = ArchiveSource.DELIVERED


def marked(snippet: Snippet | None) -> list[str]:
    assert snippet is not None
    return [text for text, matched in snippet.parts if matched]


def body_passage(query: str, text: str) -> Snippet | None:
    return passage(text, column_patterns(parse_query(query))["body"])


def test_a_passage_marks_whole_words_phrases_and_prefixes_only() -> None:
    text = "Keywords are not the keyword; KEYWORD again, and the key_word pair."
    assert marked(body_passage("keyword", text)) == ["keyword", "KEYWORD"]
    assert marked(body_passage("keyw*", text)) == ["Keywords", "keyword", "KEYWORD"]
    assert marked(body_passage('"key word"', text)) == ["key_word"]
    assert body_passage("eyword", text) is None


def test_a_passage_is_the_words_around_the_match_with_ellipses() -> None:
    words = " ".join(f"w{n}" for n in range(100))
    snippet = body_passage("needle", f"{words} needle {words}")
    assert snippet is not None
    assert snippet.text.startswith("\u2026")
    assert snippet.text.endswith("\u2026")
    assert len(snippet.text.split()) < 30
    whole = body_passage("needle", "A short <b>note</b> with the needle in it.")
    assert whole is not None
    assert whole.text == "A short <b>note</b> with the needle in it."


async def test_a_match_python_cannot_see_gets_fts5s_snippet(tmp_path: Path) -> None:
    """A word past the scanned prefix, or matched only with its accent folded, is
    still marked: those hits fall back to FTS5's snippet()."""
    archive = SqliteArchive(tmp_path / "archive")
    filler = "lorem ipsum dolor " * 20_000  # 360,000 characters before the word
    await archive.add("alice", message("far", filler + "farword end"), source=DELIVERED)
    await archive.add("alice", message("cafe", "we met at the café today"), source=DELIVERED)
    (far,) = (await archive.search("alice", parse_query("farword"))).hits
    assert ("farword", True) in far.snippet.parts
    (accent,) = (await archive.search("alice", parse_query("cafe"))).hits
    assert any(matched and text.startswith("caf") for text, matched in accent.snippet.parts)
    await archive.close()


async def test_many_matches_page_newest_first_like_few(tmp_path: Path) -> None:
    """Past TIME_WALK_FROM matches a page walks the user's entries by time; its
    pages, totals and order are those of every match sorted."""
    archive = SqliteArchive(tmp_path / "archive")
    count = TIME_WALK_FROM + 40
    batch = [
        message(
            f"m{n}",
            "common" + (" odd" if n % 2 else ""),
            date=f"Mon, {1 + n % 28:02d} Jan 2024 {n % 24:02d}:{n % 60:02d}:00 +0000",
        )
        for n in range(count)
    ]
    await archive.add_batch("alice", batch, source=DELIVERED)
    await archive.add("bob", message("b", "common"), source=DELIVERED)
    every = [entry async for entry in archive.entries("alice", parse_query("common"))]
    expected = [e.id for e in sorted(every, key=lambda e: (e.sort_time, e.id), reverse=True)]
    for text, total in (("common", count), ("common after:2024-01-10", None)):
        query = parse_query(text)
        first = await archive.search("alice", query, limit=50)
        later = await archive.search("alice", query, limit=50, offset=50)
        wanted = [
            e.id
            for e in sorted(
                [entry async for entry in archive.entries("alice", query)],
                key=lambda e: (e.sort_time, e.id),
                reverse=True,
            )
        ]
        assert first.total == len(wanted) == (total or len(wanted))
        assert [hit.entry.id for hit in first.hits + later.hits] == wanted[:100]
    assert len(expected) == count
    await archive.close()


async def test_has_attachment_reads_its_own_index(tmp_path: Path) -> None:
    archive = SqliteArchive(tmp_path / "archive")
    await archive.add("alice", message("plain", "no attachment"), source=DELIVERED)
    assert (await archive.search("alice", parse_query("has:attachment"))).total == 0
    await archive.close()
    with sqlite3.connect(tmp_path / "archive" / INDEX_FILE) as connection:
        plan = " | ".join(
            row[3]
            for row in connection.execute(
                "EXPLAIN QUERY PLAN SELECT count(*) FROM entries e "
                "WHERE e.user_id = ? AND e.has_attachment = 1",
                (1,),
            )
        )
    assert "entries_with_attachment" in plan


async def test_an_archive_from_before_the_index_gains_it_when_opened(tmp_path: Path) -> None:
    archive = SqliteArchive(tmp_path / "archive")
    await archive.add("alice", message("plain", "text"), source=DELIVERED)
    await archive.close()
    path = tmp_path / "archive" / INDEX_FILE
    with sqlite3.connect(path) as connection:
        connection.execute("DROP INDEX entries_with_attachment")
    reopened = SqliteArchive(tmp_path / "archive")
    assert (await reopened.search("alice", parse_query("text"))).total == 1
    await reopened.close()
    with sqlite3.connect(path) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "entries_with_attachment" in names
