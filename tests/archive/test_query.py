"""The search language (popbox.archive.query): what each word means, the errors that
say what and where, and that no text makes it raise anything but InvalidQuery."""

from __future__ import annotations

import contextlib
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.archive.base import (
    And,
    DateBound,
    Has,
    MatchAll,
    Not,
    Or,
    SizeBound,
    Term,
    TermField,
)
from popbox.archive.query import (
    MAX_QUERY_DEPTH,
    MAX_QUERY_LENGTH,
    MAX_QUERY_TERMS,
    normalise,
    parse_query,
    phrase_words,
    term_words,
)
from popbox.errors import InvalidQuery

ANY = TermField.ANY


def day(year: int, month: int, dom: int) -> float:
    return datetime.datetime(year, month, dom, tzinfo=datetime.UTC).timestamp()


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_blank_query_matches_everything(text: str) -> None:
    assert parse_query(text) == MatchAll()


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("invoice", Term(ANY, "invoice")),
        ("Invoice", Term(ANY, "invoice")),
        ('"quarterly report"', Term(ANY, "quarterly report", phrase=True)),
        ("from:alice", Term(TermField.FROM, "alice")),
        ("FROM:Alice@Example.COM", Term(TermField.FROM, "alice@example.com")),
        ("to:bob", Term(TermField.TO, "bob")),
        ('subject:"big news"', Term(TermField.SUBJECT, "big news", phrase=True)),
        ("body:hello", Term(TermField.BODY, "hello")),
        ("filename:report.pdf", Term(TermField.FILENAME, "report.pdf")),
        ("attachment:report.pdf", Term(TermField.FILENAME, "report.pdf")),
        ("has:attachment", Has()),
        ("before:2026-01-31", DateBound(before=True, moment=day(2026, 1, 31))),
        ("after:2026/1/2", DateBound(before=False, moment=day(2026, 1, 2))),
        ("larger:5M", SizeBound(larger=True, octets=5 * 1024 * 1024)),
        ("smaller:100k", SizeBound(larger=False, octets=100 * 1024)),
        ("larger:2G", SizeBound(larger=True, octets=2 << 30)),
        ("smaller:512", SizeBound(larger=False, octets=512)),
        ("repor*", Term(ANY, "repor*")),
        ("-spam", Not(Term(ANY, "spam"))),
        ("NOT spam", Not(Term(ANY, "spam"))),
        ("http://example.com/x", Term(ANY, "http://example.com/x")),
        ("10:30", Term(ANY, "10:30")),
        ("a-b", Term(ANY, "a-b")),
        # Full-width letters and a ligature read as the plain words they stand for.
        ("\uff46\uff49\uff4c\uff45", Term(ANY, "file")),
        ("\ufb01le", Term(ANY, "file")),
        ("STRASSE Straße", And((Term(ANY, "strasse"), Term(ANY, "strasse")))),
    ],
)
def test_words(text: str, query: object) -> None:
    assert parse_query(text) == query


def test_terms_side_by_side_are_anded() -> None:
    assert parse_query("a b AND c") == And((Term(ANY, "a"), Term(ANY, "b"), Term(ANY, "c")))


def test_or_binds_tighter_than_and_as_in_gmail() -> None:
    assert parse_query("a b OR c") == And((Term(ANY, "a"), Or((Term(ANY, "b"), Term(ANY, "c")))))


def test_lower_case_or_is_a_word() -> None:
    assert parse_query("a or b") == And((Term(ANY, "a"), Term(ANY, "or"), Term(ANY, "b")))


def test_parentheses_group() -> None:
    assert parse_query("(a OR b) -(c d)") == And(
        (
            Or((Term(ANY, "a"), Term(ANY, "b"))),
            Not(And((Term(ANY, "c"), Term(ANY, "d")))),
        )
    )


def test_negated_field_and_phrase() -> None:
    assert parse_query('-from:bob -"out of office"') == And(
        (Not(Term(TermField.FROM, "bob")), Not(Term(ANY, "out of office", phrase=True)))
    )


def test_terms_without_a_word_are_left_out() -> None:
    assert parse_query("- !! ...") == MatchAll()
    assert parse_query("hello !!") == Term(ANY, "hello")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("form:alice", "unknown field 'form:' at 1"),
        ("x in:inbox", "unknown field 'in:' at 3"),
        ("(a OR b", "unbalanced parenthesis: '(' at 1"),
        ("a) b", "unbalanced parenthesis: ')' at 2"),
        ("before:2026-13-01", "bad date 'before:2026-13-01'"),
        ("after:yesterday", "bad date 'after:yesterday'"),
        ("larger:5T", "bad size 'larger:5T'"),
        ("has:pictures", "unknown 'has:pictures'"),
        ('subject:"open', "unclosed quote at 9"),
        ("from:", "nothing after 'from:' at 1"),
        ("OR a", "OR needs a term on each side at 1"),
        ("a OR", "OR needs a term on each side at 3"),
        ("a AND", "AND needs a term on each side at 3"),
        ("NOT", "NOT needs a term after it at 1"),
        ("invoice a*", "prefix too short at 9"),
        ('subject:"big ne*"', "prefix too short at 1"),
    ],
)
def test_errors_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(InvalidQuery, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_query(text)


def test_query_length_is_bounded() -> None:
    parse_query("a" * MAX_QUERY_LENGTH)
    with pytest.raises(InvalidQuery, match="too long"):
        parse_query("a" * (MAX_QUERY_LENGTH + 1))


def test_terms_are_bounded() -> None:
    parse_query(" ".join(["w"] * MAX_QUERY_TERMS))
    with pytest.raises(InvalidQuery, match="too many terms"):
        parse_query(" ".join(["w"] * (MAX_QUERY_TERMS + 1)))


def test_nesting_is_bounded() -> None:
    parse_query("(" * MAX_QUERY_DEPTH + "a" + ")" * MAX_QUERY_DEPTH)
    with pytest.raises(InvalidQuery, match="nested too deep"):
        parse_query("(" * (MAX_QUERY_DEPTH + 1) + "a" + ")" * (MAX_QUERY_DEPTH + 1))
    with pytest.raises(InvalidQuery, match="nested too deep"):
        parse_query("-" * 400 + "a")


def test_term_words_split_what_the_index_splits() -> None:
    assert term_words("alice@example.com repor* !!") == [
        (("alice", "example", "com"), False),
        (("repor",), True),
    ]
    assert phrase_words("big new*") == (("big", "new"), True)


def test_normalise_is_nfkc_then_casefold() -> None:
    assert normalise("\uff21\uff22\uff23 Straße") == "abc strasse"


ALPHABET = st.sampled_from(
    [
        *'abcXYZ019 ()"-*:/.!@\t',
        "OR",
        "AND",
        "NOT",
        "from:",
        "has:",
        "before:",
        "larger:",
        "ß",
        "\u0301",
        "\x00",
        "\ufb01",
    ]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(ALPHABET, max_size=40).map("".join))
def test_any_query_text_parses_or_raises_invalid_query(text: str) -> None:
    with contextlib.suppress(InvalidQuery):
        parse_query(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_unicode_text_parses_or_raises_invalid_query(text: str) -> None:
    with contextlib.suppress(InvalidQuery):
        parse_query(text)
