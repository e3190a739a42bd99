"""The PostgreSQL archive's search (popbox.archive.postgresql_query) against a real
PostgreSQL: each field finds only its own words, phrases, prefixes, NOT and OR, the
bounds; user text that is tsquery or SQL syntax is only ever words; and the plan of a
search on a large archive starts from the GIN index, not a walk of the date index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.archive.base import (
    And,
    ArchiveSource,
    DateBound,
    Has,
    MatchAll,
    Not,
    Or,
    Query,
    Term,
    TermField,
)
from popbox.archive.postgresql import PostgresArchive
from popbox.archive.postgresql_query import fold, search_statement, snippet_of
from popbox.archive.query import parse_query
from popbox.archive.sqlite import SqliteArchive
from popbox.errors import InvalidQuery
from support.pgarchive import mail, postgres_archive
from support.postgres import PostgresServer

DAY = 86400.0
T0 = 1_780_000_000.0


@pytest.fixture(scope="module")
def loaded(postgres_server: PostgresServer) -> str:
    """A database with Alice's archive of four messages, and one of Bob's: made once
    for the module (the searches only read it; the attacks add other users)."""
    return asyncio.run(_load(postgres_server.create_database()))


@pytest.fixture
async def archive(loaded: str) -> AsyncIterator[PostgresArchive]:
    archive = postgres_archive(loaded)
    yield archive
    await archive.close()


async def _load(dsn: str) -> str:
    archive = postgres_archive(dsn)
    messages = {
        "report": mail(
            subject="Quarterly report",
            sender="Carol Jones <carol@example.com>",
            to="Alice <alice@example.com>, dave@example.net",
            body="The numbers for the third quarter are attached. Regards, Carol",
            date=T0,
            attachments={"q3-figures.pdf": b"%PDF-1.4 figures" * 50},
        ),
        "lunch": mail(
            subject="Lunch on Friday?",
            sender="Dave <dave@example.net>",
            to="alice@example.com",
            body="Shall we try the new café near the station? Dave",
            date=T0 + DAY,
        ),
        "invoice": mail(
            subject="Invoice 2026-117",
            sender="billing@vendor.example",
            to="alice@example.com",
            body="Please find the invoice for November. Total: 1,200 EUR. Carol's team",
            date=T0 + 2 * DAY,
            attachments={"invoice-117.pdf": b"%PDF-1.4 invoice" * 50},
        ),
        "carol": mail(
            subject="Re: report",
            sender="alice@example.com",
            to="Carol Jones <carol@example.com>",
            body="Thanks, the quarterly numbers look fine.",
            date=T0 + 3 * DAY,
        ),
    }
    for name, data in messages.items():
        await archive.add("alice", data, source=ArchiveSource.DELIVERED, folder=name)
    await archive.add(
        "bob", mail(subject="Quarterly report for Bob"), source=ArchiveSource.DELIVERED
    )
    await archive.close()
    return dsn


async def found(archive: PostgresArchive, query: Query | str, user: str = "alice") -> set[str]:
    """The folders (here: the names of the messages) of what ``query`` finds."""
    if isinstance(query, str):
        query = parse_query(query)
    page = await archive.search(user, query, limit=100)
    assert page.total == len(page.hits)
    return {hit.entry.folder for hit in page.hits}


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("report", {"report", "carol"}),
        ("subject:report", {"report", "carol"}),
        ("subject:numbers", set()),
        ("body:numbers", {"report", "carol"}),
        ("from:carol", {"report"}),
        ("to:carol", {"carol"}),
        ("carol", {"report", "invoice", "carol"}),
        ("from:alice", {"carol"}),
        ("to:alice", {"report", "lunch", "invoice"}),
        ("from:alice@example.com", {"carol"}),
        ("from:example.com", {"report", "carol"}),
        ("filename:figures", {"report"}),
        ("filename:pdf", {"report", "invoice"}),
        ("subject:pdf", set()),
        ("quarter*", {"report", "carol"}),
        ("subject:quarter*", {"report"}),
        ('"quarterly numbers"', {"carol"}),
        ('"numbers quarterly"', set()),
        ('"third quarter"', {"report"}),
        ("café", {"lunch"}),
        ("CAFÉ", {"lunch"}),
        ("cafe", {"lunch"}),
        ("2026-117", {"invoice"}),
        ("report OR lunch", {"report", "carol", "lunch"}),
        ("report -subject:re", {"report"}),
        ("NOT carol", {"lunch"}),
        ("-from:carol -from:dave", {"invoice", "carol"}),
        ("(from:carol OR from:dave) numbers", {"report"}),
        ("has:attachment", {"report", "invoice"}),
        ("has:attachment -invoice", {"report"}),
        ("after:2026-05-29", {"lunch", "invoice", "carol"}),
        ("before:2026-05-29", {"report"}),
        ("larger:1k", {"report", "invoice"}),
        ("smaller:1k", {"lunch", "carol"}),
        ("", {"report", "lunch", "invoice", "carol"}),
    ],
)
async def test_a_query_finds_exactly_its_messages(
    archive: PostgresArchive, query: str, names: set[str]
) -> None:
    assert await found(archive, query) == names


async def test_terms_without_a_word_find_nothing_and_their_negation_everything(
    archive: PostgresArchive,
) -> None:
    nothing = Term(TermField.ANY, "!!! ---")
    assert await found(archive, nothing) == set()
    assert len(await found(archive, Not(nothing))) == 4
    assert await found(archive, Or(())) == set()
    assert len(await found(archive, And(()))) == 4


async def test_a_date_bound_is_strict_before_and_inclusive_after(
    archive: PostgresArchive,
) -> None:
    moment = T0 + DAY  # the lunch message's own Date
    assert "lunch" not in await found(archive, DateBound(before=True, moment=moment))
    assert "lunch" in await found(archive, DateBound(before=False, moment=moment))


async def test_an_unknown_has_is_an_invalid_query(archive: PostgresArchive) -> None:
    with pytest.raises(InvalidQuery):
        await archive.search("alice", Has("spreadsheet"))


async def test_results_are_newest_first_with_snippets_marking_the_match(
    archive: PostgresArchive,
) -> None:
    page = await archive.search("alice", parse_query("numbers"))
    assert [hit.entry.folder for hit in page.hits] == ["carol", "report"]
    snippet = page.hits[0].snippet
    assert ("numbers", True) in snippet.parts
    assert "quarterly numbers look fine" in snippet.text
    accented = await archive.search("alice", parse_query("CAFÉ"))
    assert ("café", True) in accented.hits[0].snippet.parts
    listing = await archive.search("alice", MatchAll(), limit=2, offset=1)
    assert listing.total == 4
    assert [hit.entry.folder for hit in listing.hits] == ["invoice", "lunch"]
    assert listing.hits[0].snippet.text.startswith("Please find the invoice")
    past = await archive.search("alice", parse_query("numbers"), offset=10)
    assert (past.total, past.hits) == (2, ())


async def test_a_search_never_reaches_another_users_messages(archive: PostgresArchive) -> None:
    assert await found(archive, "quarterly", user="bob") == {"INBOX"}
    assert await found(archive, "subject:bob") == set()
    assert await found(archive, "quarterly", user="carol") == set()


# -- attacks: user text as tsquery syntax, as SQL ------------------------------------

TSQUERY_ATTACKS = [
    "x' | 'numbers",
    "numbers' & !'zzz",
    "numbers:*",
    "numbers:A",
    "(numbers | lunch)",
    "!report",
    "report <-> numbers",
    "report <2> numbers",
    "\\' | '",
    "'",
    "''",
    "\\",
    ":*",
    "&|!():*<>'\\",
]


@pytest.mark.parametrize("text", TSQUERY_ATTACKS)
async def test_tsquery_injection_through_a_term_is_only_words(
    archive: PostgresArchive, text: str
) -> None:
    """Operators typed into a term are separators: the term finds what its words find
    side by side, never an OR of two words, a negation or every message."""
    words = fold(text).split()
    for phrase in (False, True):
        result = await found(archive, Term(TermField.ANY, text, phrase=phrase))
        if not words:
            assert result == set()
            continue
        expected = await found(archive, Term(TermField.ANY, " ".join(words), phrase=phrase))
        assert result == expected
        assert result != {"report", "lunch", "invoice", "carol"}


@pytest.mark.parametrize(
    "user", ["alice' OR '1'='1", "alice'; DROP TABLE archive_entries; --", "%s", "bob\\"]
)
async def test_sql_injection_through_a_user_name_reaches_nothing(
    archive: PostgresArchive, user: str
) -> None:
    assert (await archive.search(user, MatchAll())).total == 0
    await archive.add(user, mail(subject="mine"), source=ArchiveSource.IMPORTED)
    assert await found(archive, "", user=user) == {"INBOX"}
    assert len(await found(archive, "")) == 4  # alice's, and the table, still there


@pytest.mark.parametrize("text", ["'; DROP TABLE archive_entries; --", "%s %(x)s {}", "1=1"])
async def test_sql_injection_through_a_query_is_only_words(
    archive: PostgresArchive, text: str
) -> None:
    for field in TermField:
        assert await found(archive, Term(field, text)) == set()
    assert len(await found(archive, "")) == 4


# -- the plan on a large archive ----------------------------------------------------

# 50,000 of Alice's entries of some 45 words each, one in a thousand with the word
# "needle" and one in a thousand from "finder", her oldest 2,500 with "oldword"; and
# Bob's. Vacuumed and analysed after, as autovacuum keeps a live archive.
_LOAD = """
INSERT INTO archive_messages (digest, size, pieces, refs)
SELECT sha256(i::text::bytea), 1000 + i, ''::bytea, 1 FROM generate_series(1, 51000) AS i;
INSERT INTO archive_entries (username, digest, size, received, source, folder, sender,
    recipients, subject, message_id, attachments, body, words, people)
SELECT CASE WHEN i <= 50000 THEN 'alice' ELSE 'bob' END, sha256(i::text::bytea),
    1000 + i, 1.7e9 + i * 60, 'imported', 'INBOX', 'sender', 'recipients',
    'subject ' || i, '', '{}', 'text',
    setweight(to_tsvector('simple', 'weekly status ' || (i % 97) || ' update '
        || array_to_string(array(SELECT 'w' || ((i * 31 + g) % 5000)
                                 FROM generate_series(1, 40) AS g), ' ')
        || CASE WHEN i % 1000 = 0 THEN ' needle' ELSE '' END
        || CASE WHEN i <= 2500 THEN ' oldword' ELSE '' END), 'C'),
    setweight(to_tsvector('simple', 'someone ' || (i % 13)
        || CASE WHEN i % 1000 = 500 THEN ' finder' ELSE '' END), 'A')
FROM generate_series(1, 51000) AS i;
"""


async def test_a_search_on_a_large_archive_starts_from_the_gin_index(
    postgres_dsn: str,
) -> None:
    """Newest first with a LIMIT could let the planner walk the date index and test
    every entry; the search computes its matches from the GIN index first."""
    archive = postgres_archive(postgres_dsn)
    try:
        pool = await archive.pool()
        async with pool.connection() as conn:
            await conn.execute(_LOAD.encode())
            await conn.commit()
            await conn.set_autocommit(True)
            await conn.execute("VACUUM ANALYZE archive_entries")

        async def plan(query: Query) -> str:
            statement, params = search_statement("alice", query, 50, 0)
            async with pool.connection() as conn:
                cursor = await conn.execute(b"EXPLAIN " + statement.as_bytes(conn), params)
                return "\n".join(row[0] for row in await cursor.fetchall())

        # The trap: one entry in twenty has "oldword", so the planner expects a walk
        # of the newest entries to find 50 soon; all of them are the oldest, and the
        # walk tests 47,500 entries before the first.
        async with pool.connection() as conn:
            naive = await conn.execute(
                "EXPLAIN SELECT id FROM archive_entries WHERE username = 'alice' "
                "AND words @@ to_tsquery('simple', 'oldword') "
                "ORDER BY sort_time DESC, id DESC LIMIT 50"
            )
            assert "archive_entries_listing" in str(await naive.fetchall()), "the trap"
        for text in ("oldword", "needle", "from:someone needle", "needle -status"):
            assert "archive_entries_words" in await plan(parse_query(text)), text
        assert "archive_entries_people" in await plan(parse_query("from:finder"))
        assert "archive_entries_listing" in await plan(MatchAll())
        page = await archive.search("alice", parse_query("needle"))
        assert page.total == 50
        assert page.hits[0].entry.subject == "subject 50000"
        page = await archive.search("alice", parse_query("oldword"), offset=2450)
        assert page.total == 2500
        assert [hit.entry.subject for hit in page.hits][-1] == "subject 1"
    finally:
        await archive.close()


def test_a_snippet_is_split_at_the_markers_and_nothing_else() -> None:
    text = "a <b>bold</b> \ue000word\ue001 & \ue000two\ue001"
    assert snippet_of(text).parts == (
        ("a <b>bold</b> ", False),
        ("word", True),
        (" & ", False),
        ("two", True),
    )
    assert snippet_of(None).parts == ()
    lead = snippet_of("x" * 10 + " " + "y" * 300, lead=True)
    assert lead.text == "x" * 10 + " …"


# -- the same answers as the SQLite archive --------------------------------------------

QUERY_WORDS = st.sampled_from(
    [*'abc019 ()"-*:./\\', "OR", "AND", "NOT", "from:", "to:", "subject:", "body:",
     "filename:", "has:attachment", "before:2026-05-29", "after:2026/5/30", "larger:1k",
     "smaller:2k", "quarter", "report", "carol", "numbers", "café", "cafe", "pdf", "ß",
     "\u0301", "\ufb01", "'", "&", "|", "!", "<->", ":*", "alice@example.com"]
)  # fmt: skip


def test_any_query_that_parses_finds_what_the_sqlite_archive_finds(
    loaded: str, tmp_path: Path
) -> None:
    """Whatever the parser accepts runs on PostgreSQL, and finds the same messages,
    in the same order, as the embedded archive: the two backends answer one query
    language."""
    loop = asyncio.new_event_loop()
    postgres = postgres_archive(loaded)
    sqlite = SqliteArchive(tmp_path / "archive")
    try:

        async def copy() -> None:
            async for entry in postgres.entries("alice", MatchAll()):
                data = b"".join([chunk async for chunk in postgres.read("alice", entry.id)])
                await sqlite.add(
                    "alice", data, source=entry.source, folder=entry.folder, received=entry.received
                )

        loop.run_until_complete(copy())

        async def both(query: Query) -> tuple[list[str], list[str]]:
            pages = [
                await archive.search("alice", query, limit=100) for archive in (postgres, sqlite)
            ]
            first, second = ([hit.entry.folder for hit in page.hits] for page in pages)
            return first, second

        @settings(max_examples=300, deadline=None)
        @given(
            st.one_of(
                st.lists(QUERY_WORDS, max_size=12).map(" ".join),
                st.lists(QUERY_WORDS, max_size=12).map("".join),
            )
        )
        def run(text: str) -> None:
            try:
                query = parse_query(text)
            except InvalidQuery:
                return
            on_postgres, on_sqlite = loop.run_until_complete(both(query))
            assert on_postgres == on_sqlite, text

        run()
    finally:
        loop.run_until_complete(postgres.close())
        loop.run_until_complete(sqlite.close())
        loop.close()
