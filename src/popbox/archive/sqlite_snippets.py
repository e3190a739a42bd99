"""Snippets for the embedded archive's search hits: the text around what matched,
with the matches marked, as popbox.archive.base.Snippet.

FTS5's ``snippet()`` re-tokenises a hit's whole stored column to find its best
passage, which for a page of long messages (a rare word is mostly found in long
ones) costs far more than finding the page: 50 hits of a rare word in 100,000
messages, 1.9 MB of body text, took 40 ms of snippets against 2 ms of search. So
the snippet is found here instead, with one regular expression per column built
from the query's own index words (popbox.archive.query.term_words, phrase_words)
and run over the stored text in C: the first place a term occurs, the words
around it, every occurrence in that passage marked.

The expression matches a word only where FTS5 would (whole index words, letters
and digits, case folded; a phrase's words side by side; a prefix's star), so what
it marks is a real match. It may miss one FTS5 found (a folded diacritic, a
ligature, a word FTS5 joined differently): a hit with no occurrence found in any
column gets FTS5's own ``snippet()``, so every hit still shows what matched.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, Final

from popbox.archive.base import And, Or, Query, Snippet, Term, TermField
from popbox.archive.fts import FTS_COLUMNS, highlight_match
from popbox.archive.query import phrase_words, term_words

__all__ = ["SNIPPET_WORDS", "snippets"]

# Words of text a snippet shows around what matched (Gmail shows about this many).
SNIPPET_WORDS: Final = 24
# Words shown before the first occurrence, so it is read in its sentence.
_WORDS_BEFORE: Final = 4
# Characters looked at on either side of an occurrence for the words around it:
# SNIPPET_WORDS words of ordinary text fit, a line of one endless word is cut.
_AROUND_CHARS: Final = 400
# Characters of a column searched for a term's first occurrence; one further in gets
# FTS5's snippet (a rare word is mostly found in long messages, nearly always early).
_SCAN_CHARS: Final = 256 * 1024
# How many values one "IN (...)" lists (SQLite's limit is far higher; a plan stays small).
_IN_CHUNK: Final = 500
# FTS5 snippet markers: control characters extract never lets into indexed text.
_OPEN: Final = "\x02"
_CLOSE: Final = "\x03"
_ELLIPSIS: Final = "\u2026"
# Characters of body text shown for a hit found without text (a date, a size).
_PREVIEW_CHARS: Final = 160
# The columns a snippet is taken from, in order of preference (FTS_COLUMNS names).
_SNIPPET_COLUMNS: Final = ("body", "subject", "sender", "recipients", "filenames")
_FIELD_COLUMN: Final = {
    TermField.FROM: "sender",
    TermField.TO: "recipients",
    TermField.SUBJECT: "subject",
    TermField.BODY: "body",
    TermField.FILENAME: "filenames",
}
# An index word's letters and digits, and what cannot be one (FTS5's unicode61).
_WORD_CHAR: Final = r"[^\W_]"
_WORD: Final = re.compile(r"[^\W_]+")


def _pattern(words: tuple[str, ...], prefix: bool) -> str:
    """Index words side by side, ending a word (the last one begun, ``prefix``).
    Where it starts is checked by ``_search``: an expression that opens with its
    literal lets the regular expression engine skip ahead to it."""
    body = r"[\W_]+".join(re.escape(word) for word in words)
    end = _WORD_CHAR + "*" if prefix else f"(?!{_WORD_CHAR})"
    return body + end


def _search(pattern: re.Pattern[str], text: str, start: int, stop: int) -> Iterator[re.Match[str]]:
    """The matches of ``pattern`` in ``text[start:stop]`` that begin a word."""
    at = start
    while (found := pattern.search(text, at, stop)) is not None:
        begin = found.start()
        if begin == 0 or not _WORD.match(text, begin - 1):
            yield found
            at = max(found.end(), begin + 1)
        else:
            at = begin + 1


def _terms(query: Query) -> Iterator[Term]:
    """The terms a hit matched (not those under a NOT): what a snippet marks."""
    if isinstance(query, Term):
        yield query
    elif isinstance(query, And | Or):
        for part in query.parts:
            yield from _terms(part)


def column_patterns(query: Query) -> dict[str, tuple[re.Pattern[str], ...]]:
    """For each column a term of ``query`` looks in, the expressions for its words."""
    found: dict[str, list[str]] = {}
    for term in _terms(query):
        if term.phrase:
            words, prefix = phrase_words(term.text)
            chunks = [(words, prefix)] if words else []
        else:
            chunks = term_words(term.text)
        columns = (
            _SNIPPET_COLUMNS if term.field is TermField.ANY else (_FIELD_COLUMN[term.field],)
        )
        for words, prefix in chunks:
            for column in columns:
                found.setdefault(column, []).append(_pattern(words, prefix))
    # Several terms as one alternation: one pass finds whichever comes first, where
    # one expression each would search a long text to its end for a term it lacks.
    # One term stays bare: an expression that opens with its literal is searched fast.
    return {
        column: (re.compile(_alternation(list(dict.fromkeys(patterns))), re.IGNORECASE),)
        for column, patterns in found.items()
    }


def _alternation(patterns: list[str]) -> str:
    return patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)


def _matches(
    patterns: Sequence[re.Pattern[str]], text: str, start: int, stop: int
) -> list[re.Match[str]]:
    """Every match of any of ``patterns`` in ``text[start:stop]``, in order, none
    overlapping another."""
    found = sorted(
        (match for pattern in patterns for match in _search(pattern, text, start, stop)),
        key=lambda match: (match.start(), -match.end()),
    )
    out: list[re.Match[str]] = []
    for match in found:
        if not out or match.start() >= out[-1].end():
            out.append(match)
    return out


def passage(text: str, patterns: Sequence[re.Pattern[str]]) -> Snippet | None:
    """The words around the first match of any of ``patterns`` in ``text`` (within its
    first _SCAN_CHARS), every match among them marked; None if there is none."""
    first: re.Match[str] | None = None
    for pattern in patterns:
        # Only as far as the earliest match so far: a later one would not be first.
        scan = min(len(text), _SCAN_CHARS) if first is None else first.end()
        found = next(_search(pattern, text, 0, scan), None)
        if found is not None and (first is None or found.start() < first.start()):
            first = found
    if first is None:
        return None
    lead_from = max(0, first.start() - _AROUND_CHARS)
    before = [word.start() for word in _WORD.finditer(text, lead_from, first.start())]
    if lead_from > 0:
        before = before[1:]  # the first may be a word cut in half
    after = [
        word.end()
        for word in itertools.islice(
            _WORD.finditer(text, first.start(), first.end() + _AROUND_CHARS), SNIPPET_WORDS
        )
    ]
    # SNIPPET_WORDS in all: a few before the match, more if the text ends soon after.
    lead = min(len(before), max(_WORDS_BEFORE, SNIPPET_WORDS - len(after)))
    start = before[-lead] if lead else first.start()
    stop = max(first.end(), after[min(len(after), SNIPPET_WORDS - lead) - 1] if after else 0)
    if lead_from == 0 and lead == len(before):
        start = 0  # from the column's first word: its opening too
    if _WORD.search(text, stop, stop + _AROUND_CHARS) is None and len(text) - stop < _AROUND_CHARS:
        stop = len(text)  # up to the column's last word: its closing too
    parts: list[tuple[str, bool]] = [(_ELLIPSIS, False)] if start > 0 else []
    at = start
    for match in _matches(patterns, text, start, stop):
        if match.start() > at:
            parts.append((text[at : match.start()], False))
        parts.append((match.group(), True))
        at = match.end()
    if stop > at:
        parts.append((text[at:stop], False))
    if stop < len(text):
        parts.append((_ELLIPSIS, False))
    return Snippet(tuple(parts))


def _in_chunks(
    connection: sqlite3.Connection, sql: str, ids: Sequence[int], *params: object
) -> Iterator[Any]:
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = list(ids[start : start + _IN_CHUNK])
        marks = ",".join("?" * len(chunk))
        yield from connection.execute(sql.format(marks=marks), (*params, *chunk))


def _fts_parts(marked: str) -> Snippet:
    """FTS5's snippet text with our markers as (text, matched) parts."""
    parts: list[tuple[str, bool]] = []
    for chunk in marked.split(_OPEN):
        matched, close, rest = chunk.partition(_CLOSE)
        if close:
            if matched:
                parts.append((matched, True))
            if rest:
                parts.append((rest, False))
        elif chunk:
            parts.append((chunk, False))
    return Snippet(tuple(parts))


def _fts_snippets(
    connection: sqlite3.Connection, match: str, ids: list[int], out: dict[int, Snippet]
) -> None:
    """FTS5's own snippets, for hits the expressions found nothing in."""
    calls = ", ".join(
        f"snippet(text, {FTS_COLUMNS.index(column)}, '{_OPEN}', '{_CLOSE}', "
        f"'{_ELLIPSIS}', {SNIPPET_WORDS})"
        for column in _SNIPPET_COLUMNS
    )
    for row in _in_chunks(
        connection,
        f"SELECT rowid, {calls} FROM text WHERE text MATCH ? AND rowid IN ({{marks}})",  # noqa: S608
        ids,
        match,
    ):
        marked = next((text for text in row[1:] if _OPEN in text), row[1])
        out[row[0]] = _fts_parts(marked)


def snippets(
    connection: sqlite3.Connection, user_id: int, query: Query, ids: list[int]
) -> dict[int, Snippet]:
    """A snippet for each of ``ids``: the text around what the query looks for, or
    the start of the body for a hit that matched without text."""
    out = {entry_id: Snippet() for entry_id in ids}
    if not ids:
        return out
    patterns = column_patterns(query)
    match = highlight_match(query, user_id)
    if patterns and match is not None:
        wanted = [column for column in _SNIPPET_COLUMNS if column in patterns]
        # FTS5's content table holds each column as c<index> beside the rowid, id.
        selected = ", ".join(f"c{FTS_COLUMNS.index(column)}" for column in wanted)
        missed: list[int] = []
        for row in _in_chunks(
            connection,
            f"SELECT id, {selected} FROM text_content WHERE id IN ({{marks}})",  # noqa: S608
            ids,
        ):
            entry_id = row[0]
            found = None
            for column, text in zip(wanted, row[1:], strict=True):
                if isinstance(text, str):
                    found = passage(text, patterns[column])
                    if found is not None:
                        break
            if found is None:
                missed.append(entry_id)
            else:
                out[entry_id] = found
        if missed:
            _fts_snippets(connection, match, missed, out)
    rest = [entry_id for entry_id in ids if not out[entry_id].parts]
    for entry_id, body in _in_chunks(
        connection, "SELECT rowid, substr(body, 1, ?) FROM text WHERE rowid IN ({marks})",
        rest, _PREVIEW_CHARS,
    ):  # fmt: skip
        if body:
            out[entry_id] = Snippet(
                ((body + (_ELLIPSIS if len(body) >= _PREVIEW_CHARS else ""), False),)
            )
    return out
