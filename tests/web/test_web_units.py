"""The web page's pieces on their own: the session table's bounds and expiry, the
mbox quoting of messages that arrive in chunks, and snippet marking."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from popbox.archive.base import Snippet
from popbox.web.export import _Quoter
from popbox.web.render import snippet_markup
from popbox.web.sessions import SessionTable
from support.web import StepClock


def test_session_table_is_bounded_and_drops_the_least_recently_used() -> None:
    clock = StepClock()
    table = SessionTable(idle=100, lifetime=1000, max_sessions=3, clock=clock)
    first, second, third = (table.start(name, admin=False) for name in ("a", "b", "c"))
    assert table.find(first.token) is first  # used: now the most recent
    fourth = table.start("d", admin=False)
    assert len(table) == 3
    assert table.find(second.token) is None
    assert {table.find(s.token) is not None for s in (first, third, fourth)} == {True}


def test_session_tokens_are_unique_and_unguessable_lengths() -> None:
    table = SessionTable(idle=100, lifetime=1000)
    sessions = [table.start("a", admin=False) for _ in range(100)]
    tokens = {s.token for s in sessions} | {s.csrf for s in sessions}
    assert len(tokens) == 200
    assert all(len(token) >= 43 for token in tokens)
    assert table.find("x" * 10_000) is None
    assert table.find("") is None


def test_ending_a_users_sessions_leaves_the_others() -> None:
    table = SessionTable(idle=100, lifetime=1000)
    alice = [table.start("alice", admin=False) for _ in range(3)]
    bob = table.start("bob", admin=False)
    assert table.end_user("alice") == 3
    assert all(table.find(s.token) is None for s in alice)
    assert table.find(bob.token) is bob


def _quoted_whole(message: bytes) -> bytes:
    return re.sub(rb"(?m)^(>*From )", rb">\1", message)


@given(
    st.lists(
        st.sampled_from([b"From ", b">From ", b">>", b"Fro", b"m x", b"\n", b"\r\n", b"a"])
    ).map(b"".join),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20),
)
def test_mboxrd_quoting_does_not_depend_on_chunk_boundaries(
    message: bytes, sizes: list[int]
) -> None:
    quoter = _Quoter()
    out, start, index = [], 0, 0
    while start < len(message):
        size = sizes[index % len(sizes)]
        out.append(quoter.feed(message[start : start + size]))
        start += size
        index += 1
    out.append(quoter.finish())
    assert b"".join(out) == _quoted_whole(message)


def test_snippet_marks_matches_and_escapes_everything() -> None:
    snippet = Snippet(((" <b>x</b> ", False), ("<match>", True), (" & more", False)))
    assert str(snippet_markup(snippet)) == (
        " &lt;b&gt;x&lt;/b&gt; <mark>&lt;match&gt;</mark> &amp; more"
    )
