"""From the query AST (popbox.archive.base) to PostgreSQL full-text search: the
words a message is indexed under, the tsquery a search asks, the statements that
find a page of results, and the snippets around what matched.

What a word is. Text is folded the same way on both sides, the indexed message and
the user's query (``fold``): NFKC and casefolded as every backend compares words
(popbox.archive.query.normalise), Latin letters without accents as SQLite's
unicode61 tokenizer has them, and everything but letters and digits is a space,
so ``alice@example.com`` is the words ``alice example com`` and ``from:alice`` finds
it, as SQLite's unicode61 tokenizer would. PostgreSQL's own parser would keep an
address, a host name or a file name whole, so it only ever sees the folded words.

Safety. User text never reaches SQL: each query is one statement of fixed text with
parameters. It never reaches tsquery syntax either: a term becomes tsquery operands
only as folded words, which hold nothing but letters and digits, each quoted (quotes
and backslashes doubled besides); the operators around them are ours.

Plans. A search computes its matches first, in a MATERIALIZED CTE the GIN indexes
serve, and sorts and pages only those: a date-sorted ``LIMIT`` otherwise lets the
planner walk the date index and test every row of a large archive. The listing of
everything (MatchAll) walks ``archive_entries_listing`` instead.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from psycopg import sql

from popbox.archive.base import (
    And,
    DateBound,
    Has,
    MatchAll,
    Not,
    Or,
    Query,
    SizeBound,
    Snippet,
    Term,
    TermField,
)
from popbox.archive.query import normalise, phrase_words, term_words
from popbox.errors import InvalidQuery

__all__ = [
    "ENTRY_COLUMNS",
    "PEOPLE",
    "WORDS",
    "Condition",
    "compile_query",
    "entries_statement",
    "fold",
    "highlight_tsquery",
    "search_statement",
    "snippet_of",
    "snippet_source",
]

# ts_headline marks matches with these; stored text never holds them (snippet_source),
# so a snippet's parts are exactly what PostgreSQL marked. Unicode private use.
START_MARK: Final = "\ue000"
STOP_MARK: Final = "\ue001"
# ts_headline drops whatever its parser takes for an HTML tag; a message's "<b>" is
# text, so "<" is stored as this and given back as "<" in the snippet.
LESS_THAN: Final = "\ue002"
# What a snippet shows: about two short passages of a line each, as Gmail and notmuch
# show under a result.
HEADLINE_OPTIONS: Final = (
    f'StartSel="{START_MARK}", StopSel="{STOP_MARK}", MaxWords=24, MinWords=8, '
    'ShortWord=2, MaxFragments=2, FragmentDelimiter=" … "'
)
# The opening of a message shown when nothing in particular matched (a listing).
LEAD_CHARS: Final = 160

_NOT_WORD: Final = re.compile(r"[\W_]+")
# Accents on Latin letters, once decomposed (NFKD): what SQLite's unicode61 tokenizer
# drops with remove_diacritics, so "cafe" finds "café" on either backend.
_LATIN_MARKS: Final = re.compile(
    r"(?<=[A-Za-z\u00c0-\u024f\u1e00-\u1eff])"
    r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+"
)

# The tsvectors of one entry, from folded texts. Parameters: subject, sender,
# recipients, body, attachment names (``words``); sender, recipients (``people``).
WORDS: Final = """(
    setweight(to_tsvector('simple', %s), 'A') || setweight(to_tsvector('simple', %s), 'B')
    || setweight(to_tsvector('simple', %s), 'B') || setweight(to_tsvector('simple', %s), 'C')
    || setweight(to_tsvector('simple', %s), 'D'))"""
PEOPLE: Final = """(
    setweight(to_tsvector('simple', %s), 'A') || setweight(to_tsvector('simple', %s), 'B'))"""

ENTRY_COLUMNS: Final = sql.SQL(
    "e.id, e.username, e.digest, e.size, e.received, e.date, e.sender, e.recipients, "
    "e.subject, e.message_id, e.attachments, e.source, e.folder, e.hold"
)


def unaccent(text: str) -> str:
    """``text`` in the normal form of term text (popbox.archive.query.normalise: NFKC,
    casefolded) without the accents of Latin letters."""
    text = normalise(text)
    if text.isascii():
        return text
    bare = _LATIN_MARKS.sub("", unicodedata.normalize("NFKD", text))
    return unicodedata.normalize("NFC", bare)


def fold(text: str) -> str:
    """``text`` as the words search sees (``unaccent``): letters and digits, every
    other run of characters one space."""
    return _NOT_WORD.sub(" ", unaccent(text)).strip()


def snippet_source(text: str) -> str:
    """``text`` as stored for ts_headline: without our markers (so none can occur),
    and "<" in a form its parser does not take for the start of a tag."""
    for mark in (START_MARK, STOP_MARK, LESS_THAN):
        text = text.replace(mark, " ")
    return text.replace("<", LESS_THAN)


class _Column(enum.Enum):
    WORDS = "words"
    PEOPLE = "people"


# Where each field is searched: a column, and the weights a word must carry there.
_FIELDS: Final[dict[TermField, tuple[_Column, str]]] = {
    TermField.ANY: (_Column.WORDS, ""),
    TermField.SUBJECT: (_Column.WORDS, "A"),
    TermField.BODY: (_Column.WORDS, "C"),
    TermField.FILENAME: (_Column.WORDS, "D"),
    TermField.FROM: (_Column.PEOPLE, "A"),
    TermField.TO: (_Column.PEOPLE, "B"),
}


def _groups(term: Term, *, accents: bool = False) -> list[tuple[tuple[str, ...], bool]]:
    """The term's words as the parser splits them (popbox.archive.query): groups of
    index words matched side by side, each with whether its last word is a prefix.
    ``accents``: as typed (normalised), not as the index folds them."""
    text = normalise(term.text) if accents else unaccent(term.text)
    if term.phrase:
        words, prefix = phrase_words(text)
        return [(words, prefix)] if words else []
    return term_words(text)


def _operand(word: str, prefix: bool, weights: str) -> str:
    # A word is letters and digits only; the doubling keeps it quoted whatever it is.
    quoted = word.replace("\\", "\\\\").replace("'", "''")
    suffix = ("*" if prefix else "") + weights
    return f"'{quoted}'" + (f":{suffix}" if suffix else "")


def _term_tsquery(term: Term, weights: str, *, accents: bool = False) -> str | None:
    """The term as to_tsquery text, or None when it holds no word at all."""
    phrases: list[str] = []
    for words, prefix in _groups(term, accents=accents):
        last = len(words) - 1
        operands = [_operand(word, prefix and i == last, weights) for i, word in enumerate(words)]
        phrases.append("(" + " <-> ".join(operands) + ")")
    return "(" + " & ".join(phrases) + ")" if phrases else None


def _column_of(query: Query) -> _Column | None:
    """The one column a subtree of terms searches, or None when it needs SQL (other
    conditions, two columns, a term of no words): such a subtree is one tsquery."""
    if isinstance(query, Term):
        column, weights = _FIELDS[query.field]
        return column if _term_tsquery(query, weights) is not None else None
    if isinstance(query, Not):
        return _column_of(query.part)
    if isinstance(query, And | Or) and query.parts:
        columns = {_column_of(part) for part in query.parts}
        if len(columns) == 1:
            return columns.pop()
    return None


def _tsquery(query: Query) -> str:
    """A subtree ``_column_of`` accepted, as to_tsquery text."""
    if isinstance(query, Term):
        text = _term_tsquery(query, _FIELDS[query.field][1])
        assert text is not None
        return text
    if isinstance(query, Not):
        return f"!{_tsquery(query.part)}"
    assert isinstance(query, And | Or)
    joiner = " & " if isinstance(query, And) else " | "
    return "(" + joiner.join(_tsquery(part) for part in query.parts) + ")"


@dataclass(frozen=True, slots=True)
class Condition:
    """A boolean SQL expression over ``archive_entries AS e`` and its parameters."""

    text: sql.Composable
    params: tuple[object, ...] = ()
    text_search: bool = False
    """Whether it searches a tsvector (the GIN indexes can find its rows)."""


_TRUE: Final = Condition(sql.SQL("true"))
_FALSE: Final = Condition(sql.SQL("false"))


def compile_query(query: Query) -> Condition:
    """``query`` as a condition on one entry; InvalidQuery for what is not known."""
    column = _column_of(query)
    if column is not None:
        text = sql.SQL("e.{} @@ to_tsquery('simple', %s)").format(sql.Identifier(column.value))
        return Condition(text, (_tsquery(query),), text_search=True)
    if isinstance(query, Term):
        return _FALSE  # no word to look for: nothing has it
    if isinstance(query, MatchAll):
        return _TRUE
    if isinstance(query, Has):
        if query.what != "attachment":
            raise InvalidQuery(f"has:{query.what}: only has:attachment is known")
        return Condition(sql.SQL("cardinality(e.attachments) > 0"))
    if isinstance(query, DateBound):
        op = "<" if query.before else ">="
        return Condition(sql.SQL(f"e.sort_time {op} %s"), (float(query.moment),))
    if isinstance(query, SizeBound):
        op = ">" if query.larger else "<"
        return Condition(sql.SQL(f"e.size {op} %s"), (int(query.octets),))
    if isinstance(query, Not):
        inner = compile_query(query.part)
        return Condition(sql.SQL("NOT ({})").format(inner.text), inner.params, inner.text_search)
    if isinstance(query, And | Or):
        if not query.parts:
            return _TRUE if isinstance(query, And) else _FALSE
        parts = [compile_query(part) for part in query.parts]
        joiner = sql.SQL(" AND " if isinstance(query, And) else " OR ")
        return Condition(
            joiner.join(sql.SQL("({})").format(part.text) for part in parts),
            tuple(param for part in parts for param in part.params),
            any(part.text_search for part in parts),
        )
    raise InvalidQuery(f"not a query: {query!r}")


def _positive_terms(query: Query) -> Iterator[Term]:
    """The terms a match has (not those under a NOT): what a snippet marks."""
    if isinstance(query, Term):
        yield query
    elif isinstance(query, And | Or):
        for part in query.parts:
            yield from _positive_terms(part)


def highlight_tsquery(query: Query) -> str | None:
    """to_tsquery text that marks, in a message's text, every word the query looked
    for (in any field, weights aside: the snippet's text has none); None if none.
    The text is not folded, so each word is marked as typed and as folded."""
    texts = [
        _term_tsquery(term, "", accents=accents)
        for term in _positive_terms(query)
        for accents in (False, True)
    ]
    found = [text for text in dict.fromkeys(texts) if text is not None]
    return " | ".join(found) if found else None


def _snippet_column(query: Query) -> tuple[sql.Composable, tuple[object, ...]]:
    highlight = highlight_tsquery(query)
    if highlight is None:
        return sql.SQL("left(e.body, %s)"), (LEAD_CHARS,)
    return (
        sql.SQL("ts_headline('simple', e.body, to_tsquery('simple', %s), %s)"),
        (highlight, HEADLINE_OPTIONS),
    )


def search_statement(
    user: str, query: Query, limit: int, offset: int
) -> tuple[sql.Composed, tuple[object, ...]]:
    """One statement for a page of ``search``: rows of (total, the ENTRY_COLUMNS,
    snippet text), newest first; a page past the end is one row of NULLs but the
    total. The condition is computed before anything is sorted (see the module)."""
    condition = compile_query(query)
    snippet, snippet_params = _snippet_column(query)
    where = sql.SQL("e.username = %s AND ({})").format(condition.text)
    where_params = (user, *condition.params)
    if condition.text_search:
        # The matches first (the GIN indexes find them), then their order and page.
        ids = sql.SQL(
            "WITH matched AS MATERIALIZED (SELECT e.id, e.sort_time "
            "FROM archive_entries AS e WHERE {where}), "
            "page AS (SELECT id, sort_time FROM matched "
            "ORDER BY sort_time DESC, id DESC LIMIT %s OFFSET %s) "
        ).format(where=where)
        total: sql.Composable = sql.SQL("SELECT count(*) AS total FROM matched")
        total_params: tuple[object, ...] = ()
    else:
        # Nothing for a GIN index: the listing index gives the page in order, and
        # the count is a walk of the user's part of it.
        ids = sql.SQL(
            "WITH page AS (SELECT e.id, e.sort_time FROM archive_entries AS e "
            "WHERE {where} ORDER BY e.sort_time DESC, e.id DESC LIMIT %s OFFSET %s) "
        ).format(where=where)
        total = sql.SQL("SELECT count(*) AS total FROM archive_entries AS e WHERE {}").format(where)
        total_params = where_params
    statement = sql.SQL(
        "{ids}SELECT t.total, {columns}, {snippet} "
        "FROM ({total}) AS t "
        "LEFT JOIN (page JOIN archive_entries AS e ON e.id = page.id) ON true "
        "ORDER BY page.sort_time DESC, page.id DESC"
    ).format(ids=ids, total=total, columns=ENTRY_COLUMNS, snippet=snippet)
    # The placeholders in the order they appear: the page, the snippet, the total.
    return statement, (*where_params, limit, offset, *snippet_params, *total_params)


def entries_statement(
    user: str, query: Query, after_id: int, batch: int
) -> tuple[sql.Composed, tuple[object, ...]]:
    """The next ``batch`` matching entries above ``after_id``, in id order."""
    condition = compile_query(query)
    statement = sql.SQL(
        "SELECT {columns} FROM archive_entries AS e "
        "WHERE e.username = %s AND e.id > %s AND ({condition}) ORDER BY e.id LIMIT %s"
    ).format(columns=ENTRY_COLUMNS, condition=condition.text)
    return statement, (user, after_id, *condition.params, batch)


def snippet_of(text: str | None, *, lead: bool = False) -> Snippet:
    """A Snippet from ts_headline's output (or a message's opening, ``lead``)."""
    if not text:
        return Snippet()
    text = text.replace(LESS_THAN, "<")
    if lead:
        words = " ".join(text.split())
        if len(words) >= LEAD_CHARS:
            # Cut at a word's end, and say that the text goes on.
            words = words[:LEAD_CHARS].rsplit(" ", 1)[0] + " …"
        return Snippet(((words, False),))
    parts: list[tuple[str, bool]] = []
    for piece in re.split(f"({START_MARK}.*?{STOP_MARK})", text, flags=re.DOTALL):
        if not piece:
            continue
        if piece.startswith(START_MARK) and piece.endswith(STOP_MARK):
            parts.append((piece[1:-1], True))
        else:
            parts.append((piece, False))
    return Snippet(tuple(parts))
