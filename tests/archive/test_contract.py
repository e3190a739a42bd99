"""The archive contract (popbox.archive.base): every Archive implementation passes it.

Each test runs once per backend through the parametrized ``archive`` fixture.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from archive_helpers import ArchiveFactory, message

from popbox.archive.base import (
    MAX_PAGE,
    Archive,
    ArchiveSource,
    ArchiveUsage,
    MatchAll,
    Term,
    TermField,
)
from popbox.archive.query import parse_query
from popbox.errors import EntryOnHold, NoSuchEntry

DELIVERED = ArchiveSource.DELIVERED
DAY = 86400.0

# Octets that must come back exactly as they went in.
SAMPLES: list[bytes] = [
    b"Subject: plain\n\nbare LF line ends\n",
    b"Subject: crlf\r\n\r\nalready CRLF\r\n",
    b"Subject: open\n\nno final line end",
    b"\x00\xff 8-bit and NUL \x80\n" + b"x" * 5000 + b"\n",
    b"",
    b"Subject: long\n\n" + b"long body line\n" * 30_000,
]


async def read_all(archive: Archive, user: str, entry_id: int) -> bytes:
    return b"".join([chunk async for chunk in archive.read(user, entry_id)])


async def ids(archive: Archive, user: str, text: str) -> list[int]:
    page = await archive.search(user, parse_query(text), limit=MAX_PAGE)
    assert page.total == len(page.hits)
    return [hit.entry.id for hit in page.hits]


def with_attachment(name: str, payload: bytes, text: str = "see attached") -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: Carol <carol@example.org>\r\nTo: alice@example.com\r\n"
        b"Subject: files\r\nDate: Thu, 02 Jul 2026 09:00:00 +0000\r\n"
        b'Content-Type: multipart/mixed; boundary="XYZ"\r\n\r\n'
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\n" + text.encode() + b"\r\n"
        b"--XYZ\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--XYZ--\r\n"
    )


async def test_read_gives_back_exactly_what_was_added(archive: Archive) -> None:
    for index, data in enumerate(SAMPLES):
        added = await archive.add("alice", data, source=DELIVERED, received=1000.0 + index)
        assert added.new
        assert added.entry.size == len(data)
        assert await read_all(archive, "alice", added.entry.id) == data


async def test_add_from_a_file(archive: Archive, tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    data = message("from a file", "file body") + b"y" * 300_000
    path.write_bytes(data)
    added = await archive.add("alice", path, source=ArchiveSource.IMPORTED, folder="Old")
    assert await read_all(archive, "alice", added.entry.id) == data
    assert added.entry.folder == "Old"
    assert added.entry.source is ArchiveSource.IMPORTED


async def test_entry_shows_decoded_headers(archive: Archive) -> None:
    data = message(
        "=?utf-8?q?Gr=C3=BC=C3=9Fe?=",
        "hi",
        sender="=?utf-8?q?J=C3=BCrgen?= <j@example.de>",
        extra="Cc: carol@example.org\r\nMessage-ID: <id1@example.de>\r\n",
    )
    added = await archive.add("alice", data, source=DELIVERED, received=5.0)
    entry = await archive.entry("alice", added.entry.id)
    assert entry == added.entry
    assert entry.subject == "Grüße"
    assert entry.sender == "Jürgen <j@example.de>"
    assert entry.recipients == "bob@example.com, carol@example.org"
    assert entry.message_id == "<id1@example.de>"
    assert entry.date == 1796637600.0
    assert entry.received == 5.0
    assert entry.user == "alice"
    assert not entry.hold


async def test_the_same_message_twice_is_one_entry(archive: Archive) -> None:
    data = message("twice")
    first = await archive.add("alice", data, source=DELIVERED)
    second = await archive.add("alice", data, source=ArchiveSource.COLLECTED)
    assert first.new
    assert not second.new
    assert second.entry.id == first.entry.id
    assert (await archive.search("alice", MatchAll())).total == 1


async def test_the_same_message_for_two_users_is_two_entries_of_one_digest(
    archive: Archive,
) -> None:
    data = message("shared")
    mine = await archive.add("alice", data, source=DELIVERED)
    theirs = await archive.add("bob", data, source=DELIVERED)
    assert theirs.new
    assert mine.entry.id != theirs.entry.id
    assert mine.entry.digest == theirs.entry.digest
    await archive.delete("alice", [mine.entry.id])
    assert await read_all(archive, "bob", theirs.entry.id) == data


async def test_add_batch_keeps_order_and_recognises_repeats(archive: Archive) -> None:
    first = message("one")
    batch = [first, message("two"), first, message("three")]
    added = await archive.add_batch("alice", batch, source=ArchiveSource.IMPORTED)
    assert [item.new for item in added] == [True, True, False, True]
    assert added[2].entry.id == added[0].entry.id
    for item, data in zip(added, batch, strict=True):
        assert await read_all(archive, "alice", item.entry.id) == data
    again = await archive.add_batch("alice", batch[:2], source=ArchiveSource.IMPORTED)
    assert [item.new for item in again] == [False, False]
    assert await archive.add_batch("alice", [], source=ArchiveSource.IMPORTED) == []


async def test_known_origins(archive: Archive) -> None:
    assert await archive.known_origins("alice", ["Archive/1"]) == set()
    await archive.add("alice", message("a"), source=ArchiveSource.DISPOSITION, origin="Archive/1")
    await archive.add("alice", message("b"), source=ArchiveSource.DISPOSITION, origin="Archive/2")
    # The same message from another origin: no new entry, but the origin is known.
    await archive.add("alice", message("a"), source=ArchiveSource.DISPOSITION, origin="Archive/3")
    wanted = ["Archive/1", "Archive/3", "Archive/9"]
    assert await archive.known_origins("alice", wanted) == {"Archive/1", "Archive/3"}
    assert await archive.known_origins("bob", wanted) == set()
    assert await archive.known_origins("alice", []) == set()


async def test_results_are_newest_first_by_date_else_received(archive: Archive) -> None:
    old = await archive.add(
        "alice", message("old", date="Thu, 01 Jan 2026 00:00:00 +0000"), source=DELIVERED,
        received=3_000_000_000.0,
    )  # fmt: skip
    undated = await archive.add(
        "alice", message("undated", date=None), source=DELIVERED, received=1_790_000_000.0
    )
    new = await archive.add(
        "alice", message("new", date="Mon, 07 Dec 2026 10:00:00 +0000"), source=DELIVERED,
        received=1.0,
    )  # fmt: skip
    page = await archive.search("alice", MatchAll())
    assert [hit.entry.id for hit in page.hits] == [new.entry.id, undated.entry.id, old.entry.id]
    assert page.total == 3
    second = await archive.search("alice", MatchAll(), limit=1, offset=1)
    assert [hit.entry.id for hit in second.hits] == [undated.entry.id]
    assert second.total == 3


async def corpus(archive: Archive) -> dict[str, int]:
    """A few messages that the query words tell apart."""
    found: dict[str, int] = {}
    items = {
        "report": message(
            "Quarterly report", "The numbers are in.", sender="Dana <dana@corp.example>",
            to="alice@example.com", date="Wed, 01 Jul 2026 12:00:00 +0000",
        ),
        "lunch": message(
            "Lunch on Friday?", "Pizza at noon, the usual place.", sender="bob@example.com",
            to="team@example.com", date="Fri, 03 Jul 2026 09:00:00 +0000",
            extra="Cc: alice@example.com\r\n",
        ),
        "files": with_attachment("budget-2026.xlsx", b"\x01" * 40_000, "budget attached"),
        "html": (
            b"From: news@shop.example\r\nTo: alice@example.com\r\nSubject: Sale\r\n"
            b"Date: Sat, 04 Jul 2026 09:00:00 +0000\r\nContent-Type: text/html\r\n\r\n"
            b"<p>Big <b>discount</b> today</p><script>tracking pixel</script>\r\n"
        ),
    }  # fmt: skip
    for name, data in items.items():
        found[name] = (await archive.add("alice", data, source=DELIVERED, received=0.0)).entry.id
    return found


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("numbers", {"report"}),
        ("NUMBERS", {"report"}),
        ('"the usual place"', {"lunch"}),
        ('"usual the"', set()),
        ("from:dana", {"report"}),
        ("from:corp.example", {"report"}),
        ("to:team", {"lunch"}),
        ("to:alice", {"report", "lunch", "files", "html"}),
        ("subject:lunch", {"lunch"}),
        ("subject:pizza", set()),
        ("body:pizza", {"lunch"}),
        ("filename:budget", {"files"}),
        ("attachment:xlsx", {"files"}),
        ("budget-2026.xlsx", {"files"}),
        ("has:attachment", {"files"}),
        ("-has:attachment", {"report", "lunch", "html"}),
        ("discount", {"html"}),
        ("tracking", set()),
        ("b", set()),
        ("quarter*", {"report"}),
        ("pizza OR numbers", {"lunch", "report"}),
        ("pizza numbers", set()),
        ("-pizza -numbers", {"files", "html"}),
        ("NOT from:bob", {"report", "files", "html"}),
        ("(pizza OR numbers) -from:bob", {"report"}),
        ("after:2026-07-03", {"lunch", "html"}),
        ("before:2026-07-03", {"report", "files"}),
        ("after:2026-07-01 before:2026-07-02", {"report"}),
        ("larger:20k", {"files"}),
        ("smaller:20k", {"report", "lunch", "html"}),
        ("numbers OR larger:20k", {"report", "files"}),
        ("-(numbers OR larger:20k)", {"lunch", "html"}),
        ("sale OR after:2026-07-04", {"html"}),
        ("", {"report", "lunch", "files", "html"}),
    ],
)
async def test_query_words(archive: Archive, query: str, names: set[str]) -> None:
    found = await corpus(archive)
    by_id = {entry_id: name for name, entry_id in found.items()}
    assert {by_id[entry_id] for entry_id in await ids(archive, "alice", query)} == names


async def test_snippets_mark_what_matched_without_html(archive: Archive) -> None:
    await archive.add(
        "alice",
        message("notes", "Some <b>bold</b> words & the keyword appears here once."),
        source=DELIVERED,
    )
    (hit,) = (await archive.search("alice", parse_query("keyword"))).hits
    assert ("keyword", True) in hit.snippet.parts
    assert "<b>bold</b>" in hit.snippet.text  # the text as written, not markup of ours
    assert all(not matched for text, matched in hit.snippet.parts if text != "keyword")


async def test_entries_walk_in_id_order_and_resume(archive: Archive) -> None:
    added = [
        (await archive.add("alice", message(f"m{index}", "walk"), source=DELIVERED)).entry.id
        for index in range(7)
    ]
    await archive.add("alice", message("other", "different"), source=DELIVERED)
    walked = [entry.id async for entry in archive.entries("alice", parse_query("walk"))]
    assert walked == added
    rest = [
        entry.id async for entry in archive.entries("alice", parse_query("walk"), after_id=added[2])
    ]
    assert rest == added[3:]
    assert [entry.id async for entry in archive.entries("bob", MatchAll())] == []


async def test_another_users_entry_is_no_entry_everywhere(archive: Archive) -> None:
    """Cross-user access: bob names alice's entry ids and gets what a missing id gets."""
    secret = await archive.add("alice", message("secret plans", "launch codes"), source=DELIVERED)
    await archive.add("bob", message("bob's own", "nothing secret"), source=DELIVERED)
    entry_id = secret.entry.id
    with pytest.raises(NoSuchEntry):
        await archive.entry("bob", entry_id)
    with pytest.raises(NoSuchEntry):
        await read_all(archive, "bob", entry_id)
    with pytest.raises(NoSuchEntry):
        await archive.entry("bob", 999_999)
    with pytest.raises(NoSuchEntry):
        await read_all(archive, "bob", 999_999)
    assert await archive.delete("bob", [entry_id]) == 0
    assert await archive.set_hold("bob", [entry_id], True) == 0
    assert await ids(archive, "bob", "launch") == []
    assert await ids(archive, "bob", "") != [entry_id]
    assert entry_id not in [entry.id async for entry in archive.entries("bob", MatchAll())]
    # Untouched for alice.
    assert not (await archive.entry("alice", entry_id)).hold
    assert await ids(archive, "alice", "launch") == [entry_id]


async def test_fts5_syntax_injection_cannot_reach_another_users_rows(archive: Archive) -> None:
    """FTS5 syntax injection through the term text: quotes, column filters, NEAR and
    stars are words to look for, never syntax, so bob finds none of alice's mail."""
    await archive.add("alice", message("alpha", "alice private words"), source=DELIVERED)
    await archive.add("bob", message("beta", "bob words"), source=DELIVERED)
    hostile = [
        'x" OR "private',
        '" OR owner : * OR "',
        "owner : owner1",
        "private NEAR(alice private, 5)",
        '{owner sender} : "alice" OR "',
        "*",
        '"',
        "') OR 1=1 --",
    ]
    for text in hostile:
        for query in (Term(TermField.ANY, text), Term(TermField.ANY, text, phrase=True)):
            page = await archive.search("bob", query)
            assert all(hit.entry.user == "bob" for hit in page.hits), text
            assert all("private" not in hit.snippet.text for hit in page.hits), text
    assert await ids(archive, "bob", '"x\\" OR private') == []
    assert await ids(archive, "bob", 'subject:"alpha" OR owner1 OR owner2') == []


async def test_hold_wins_over_delete(archive: Archive) -> None:
    kept = await archive.add("alice", message("evidence"), source=DELIVERED)
    other = await archive.add("alice", message("chatter"), source=DELIVERED)
    assert await archive.set_hold("alice", [kept.entry.id], True) == 1
    assert await archive.set_hold("alice", [kept.entry.id], True) == 0
    assert (await archive.entry("alice", kept.entry.id)).hold
    with pytest.raises(EntryOnHold):
        await archive.delete("alice", [other.entry.id, kept.entry.id])
    # None went, not even the one that is not held.
    assert await archive.entry("alice", other.entry.id)
    assert await archive.set_hold("alice", None, False) == 1
    assert await archive.delete("alice", [other.entry.id, kept.entry.id, 424242]) == 2
    assert (await archive.search("alice", MatchAll())).total == 0
    with pytest.raises(NoSuchEntry):
        await read_all(archive, "alice", kept.entry.id)


async def test_hold_wins_over_expiry(archive: Archive) -> None:
    now = 2_000_000_000.0
    old_held = await archive.add(
        "alice", message("old held"), source=DELIVERED, received=now - 40 * DAY
    )
    old = await archive.add("alice", message("old"), source=DELIVERED, received=now - 31 * DAY)
    recent = await archive.add(
        "alice", message("recent"), source=DELIVERED, received=now - 29 * DAY
    )
    theirs = await archive.add("bob", message("bob old"), source=DELIVERED, received=now - 40 * DAY)
    await archive.set_hold("alice", [old_held.entry.id], True)
    assert await archive.expire("alice", 30, now) == 1
    left = {hit.entry.id for hit in (await archive.search("alice", MatchAll())).hits}
    assert left == {old_held.entry.id, recent.entry.id}
    assert old.entry.id not in left
    assert (await archive.entry("bob", theirs.entry.id)).id == theirs.entry.id
    assert await archive.expire("nobody", 1, now) == 0


async def test_set_hold_on_all_of_a_users_entries(archive: Archive) -> None:
    for index in range(3):
        await archive.add("alice", message(f"m{index}"), source=DELIVERED)
    await archive.add("bob", message("b"), source=DELIVERED)
    assert await archive.set_hold("alice", None, True) == 3
    usage = {item.user: item for item in await archive.users()}
    assert usage["alice"].held == 3
    assert usage["bob"].held == 0


async def test_users_by_name_with_their_share(archive: Archive) -> None:
    assert await archive.users() == []
    one, two = message("one"), message("two, longer")
    await archive.add("zoe", one, source=DELIVERED)
    await archive.add("adam", one, source=DELIVERED)
    await archive.add("adam", two, source=DELIVERED)
    assert await archive.users() == [
        ArchiveUsage("adam", 2, len(one) + len(two), 0),
        ArchiveUsage("zoe", 1, len(one), 0),
    ]


async def test_reindex_gives_the_same_results(archive: Archive) -> None:
    await corpus(archive)
    await archive.add("bob", message("bob", "numbers too"), source=DELIVERED)
    queries = ["numbers", "from:dana", "has:attachment", "discount", "-pizza", "filename:budget"]
    before = {query: await ids(archive, "alice", query) for query in queries}
    assert await archive.reindex("alice") == 4
    assert {query: await ids(archive, "alice", query) for query in queries} == before
    assert await archive.reindex() == 5
    assert {query: await ids(archive, "alice", query) for query in queries} == before
    assert await ids(archive, "bob", "numbers") != []
    assert await archive.reindex("nobody") == 0


async def test_a_reopened_archive_has_everything(
    make_archive: ArchiveFactory, tmp_path: Path
) -> None:
    first = await make_archive(tmp_path)
    added = await first.add("alice", message("persist", "kept words"), source=DELIVERED)
    await first.close()
    second = await make_archive(tmp_path)
    try:
        assert await read_all(second, "alice", added.entry.id) == message("persist", "kept words")
        assert await ids(second, "alice", "kept") == [added.entry.id]
    finally:
        await second.close()


async def test_malformed_messages_are_kept_byte_exact(archive: Archive) -> None:
    hostile = [
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n--x--\r\n--x\r\n',
        b"Subject: =?x-unknown?q?=FF?=\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\n\xff",
        b"\xff\xfe\x00garbage without headers",
        b"Content-Transfer-Encoding: base64\r\n\r\n%%%%not base64",
    ]
    for data in hostile:
        added = await archive.add("alice", data, source=DELIVERED)
        assert await read_all(archive, "alice", added.entry.id) == data


async def test_search_page_is_bounded(archive: Archive) -> None:
    await archive.add_batch(
        "alice", [message(f"m{index}") for index in range(5)], source=ArchiveSource.IMPORTED
    )
    assert len((await archive.search("alice", MatchAll(), limit=2)).hits) == 2
    assert len((await archive.search("alice", MatchAll(), limit=MAX_PAGE * 10)).hits) == 5
    assert (await archive.search("alice", MatchAll(), offset=10)).hits == ()
