"""The query AST (popbox.archive.base) as SQLite: an FTS5 MATCH expression and SQL.

Every FTS5 row carries its owner's token in the ``owner`` column, and every MATCH
this module writes starts with ``owner : "<token>" AND``: FTS5 then walks only the
postings that meet that user's own, skipping the rest through its doclist index, so
one user's search costs what that user's mail costs however many users share the
archive (the SQL around it checks the user again).

User text reaches FTS5 only as index words (letters and digits, see
popbox.archive.query.term_words) inside double quotes, so nothing a user types can
be read as FTS5 syntax: no quote, ``*``, ``NEAR``, ``:`` or column name survives into
the expression except where this module writes one itself.

Text terms become the MATCH; dates, sizes and has:attachment become conditions on
the ``entries`` row (alias ``e``); a NOT or an OR that mixes the two becomes a
sub-select over the FTS table. The sort time (date, else received) is a column of
its own, so "newest first" is an index scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from popbox.archive.base import (
    And,
    DateBound,
    Has,
    MatchAll,
    Not,
    Or,
    Query,
    SizeBound,
    Term,
    TermField,
)
from popbox.archive.query import MIN_PREFIX, phrase_words, term_words

__all__ = [
    "FTS_COLUMNS",
    "CompiledQuery",
    "compile_query",
    "highlight_match",
    "owner_token",
]

# The FTS5 table's columns, in order; rowid is the entry's id.
FTS_COLUMNS: Final = ("owner", "sender", "recipients", "subject", "body", "filenames")
_COLUMNS: Final = {
    TermField.ANY: "{sender recipients subject body filenames}",
    TermField.FROM: "sender",
    TermField.TO: "recipients",
    TermField.SUBJECT: "subject",
    TermField.BODY: "body",
    TermField.FILENAME: "filenames",
}
# What can never match: an index word no tokenizer makes from text.
_NOTHING: Final = "0"


def owner_token(user_id: int) -> str:
    """The word that marks a user's rows in the FTS5 ``owner`` column."""
    return f"owner{user_id}"


def _quoted(words: tuple[str, ...], prefix: bool) -> str:
    # Index words hold letters and digits only, so nothing inside the quotes can
    # close them; the prefix star is written by us, outside, and only after a word
    # as long as the parser asks for (a Term built some other way included).
    star = prefix and len(words[-1]) >= MIN_PREFIX
    return '"' + " ".join(words) + '"' + (" *" if star else "")


def _term(term: Term) -> str | None:
    """A term as an FTS5 expression, or None if it holds no index word."""
    column = _COLUMNS[term.field]
    if term.phrase:
        words, prefix = phrase_words(term.text)
        if not words:
            return None
        return f"{column} : {_quoted(words, prefix)}"
    chunks = term_words(term.text)
    if not chunks:
        return None
    expressions = [f"{column} : {_quoted(words, prefix)}" for words, prefix in chunks]
    return expressions[0] if len(expressions) == 1 else "(" + " AND ".join(expressions) + ")"


@dataclass(slots=True)
class _Part:
    """A compiled subquery: rows matching ``fts`` (if any) AND ``sql`` (if any)."""

    fts: str | None = None
    sql: str | None = None
    params: list[object] = field(default_factory=list)
    never: bool = False


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    """``match`` (an FTS5 expression already restricted to the user, or None for a
    query without text) AND ``where`` (SQL over ``entries e``, with ``params``)."""

    match: str | None
    where: str
    params: tuple[object, ...]


class _Compiler:
    def __init__(self, owner: str) -> None:
        self._owner = f'owner : "{owner}"'

    def _subselect(self, fts: str) -> tuple[str, list[object]]:
        # The expression goes in as a parameter, never as SQL text.
        return "e.id IN (SELECT rowid FROM text WHERE text MATCH ?)", [fts]

    def as_sql(self, part: _Part) -> tuple[str, list[object]]:
        """``part`` as one SQL condition on ``e``."""
        if part.never:
            return "0", []
        pieces: list[str] = []
        params: list[object] = []
        if part.fts is not None:
            condition, params = self._subselect(f"{self._owner} AND {part.fts}")
            pieces.append(condition)
        if part.sql is not None:
            pieces.append(part.sql)
            params.extend(part.params)
        if not pieces:
            return "1", []
        return "(" + " AND ".join(pieces) + ")", params

    def compile(self, query: Query) -> _Part:
        if isinstance(query, Term):
            fts = _term(query)
            return _Part() if fts is None else _Part(fts=fts)
        if isinstance(query, Has):
            return _Part(sql="e.has_attachment = 1")
        if isinstance(query, DateBound):
            operator = "<" if query.before else ">="
            return _Part(sql=f"e.sort_time {operator} ?", params=[query.moment])
        if isinstance(query, SizeBound):
            operator = ">" if query.larger else "<"
            return _Part(sql=f"e.size {operator} ?", params=[query.octets])
        if isinstance(query, MatchAll):
            return _Part()
        if isinstance(query, And):
            return self._and([self.compile(part) for part in query.parts])
        if isinstance(query, Or):
            return self._or([self.compile(part) for part in query.parts])
        if isinstance(query, Not):
            return self._not(self.compile(query.part))
        raise TypeError(f"not a query: {query!r}")

    def _and(self, parts: list[_Part]) -> _Part:
        if any(part.never for part in parts):
            return _Part(never=True)
        fts = [part.fts for part in parts if part.fts is not None]
        sql = [part.sql for part in parts if part.sql is not None]
        params = [param for part in parts for param in part.params]
        return _Part(
            fts=None if not fts else fts[0] if len(fts) == 1 else "(" + " AND ".join(fts) + ")",
            sql=None if not sql else "(" + " AND ".join(sql) + ")",
            params=params,
        )

    def _or(self, parts: list[_Part]) -> _Part:
        parts = [part for part in parts if not part.never]
        if not parts:
            return _Part(never=True)
        if any(part.fts is None and part.sql is None for part in parts):
            return _Part()  # one side matches everything
        if all(part.sql is None for part in parts):
            return _Part(fts="(" + " OR ".join(str(part.fts) for part in parts) + ")")
        conditions: list[str] = []
        params: list[object] = []
        for part in parts:
            condition, part_params = self.as_sql(part)
            conditions.append(condition)
            params.extend(part_params)
        return _Part(sql="(" + " OR ".join(conditions) + ")", params=params)

    def _not(self, part: _Part) -> _Part:
        if part.never:
            return _Part()
        if part.fts is None and part.sql is None:
            return _Part(never=True)
        if part.sql is None and part.fts is not None:
            # FTS5's NOT is binary: the user's own rows without the match.
            return _Part(fts=f"({self._owner} NOT {part.fts})")
        condition, params = self.as_sql(part)
        return _Part(sql=f"NOT {condition}", params=params)


def compile_query(query: Query, user_id: int) -> CompiledQuery:
    """``query`` for the user with ``user_id``: a MATCH (owner token first) and SQL."""
    compiler = _Compiler(owner_token(user_id))
    part = compiler.compile(query)
    if part.never:
        return CompiledQuery(None, "0", ())
    match = None if part.fts is None else f'owner : "{owner_token(user_id)}" AND {part.fts}'
    return CompiledQuery(match, part.sql or "1", tuple(part.params))


def _positive_terms(query: Query, out: list[str]) -> None:
    if isinstance(query, Term):
        fts = _term(query)
        if fts is not None:
            out.append(fts)
    elif isinstance(query, And | Or):
        for part in query.parts:
            _positive_terms(part, out)


def highlight_match(query: Query, user_id: int) -> str | None:
    """An FTS5 expression matching any term the query looks for (not under a NOT),
    for snippets: what to mark in a hit's text. None if it looks for no text."""
    terms: list[str] = []
    _positive_terms(query, terms)
    if not terms:
        return None
    return f'owner : "{owner_token(user_id)}" AND (' + " OR ".join(terms) + ")"
