"""The search box's language read into the query AST of popbox.archive.base.

Gmail's and notmuch's words: bare terms and ``"quoted phrases"`` anywhere in the
message; ``from:`` ``to:`` (To and Cc) ``subject:`` ``body:`` ``filename:`` (also
``attachment:``), each with a word or a ``"phrase"``; ``has:attachment``;
``before:``/``after:`` a day (``YYYY-MM-DD`` or ``YYYY/MM/DD``, UTC: before is
strictly before that day's midnight, after is on or after it); ``larger:``/
``smaller:`` a size with an optional k/M/G suffix (1024-based, as Gmail's);
a trailing ``*`` matches every word it begins (``MIN_PREFIX`` letters at least).

Operators as Gmail has them: terms side by side are ANDed (``AND`` may be written),
``OR`` (upper case) binds tighter than that, ``NOT`` or a leading ``-`` negates, and
parentheses group. ``a b OR c`` is therefore ``a AND (b OR c)``, Gmail's reading.

Term text is normalised here and only here (``normalise``: NFKC, then casefold), so
every backend compares the same words. A term without a single letter or digit
(``-``, ``!!``) says nothing a word index could find and is left out. Whatever text
comes in, the parser either returns a Query or raises InvalidQuery saying what went
wrong and where (1-based character positions).
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from dataclasses import dataclass
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
from popbox.errors import InvalidQuery

__all__ = [
    "MAX_QUERY_DEPTH",
    "MAX_QUERY_LENGTH",
    "MAX_QUERY_TERMS",
    "MIN_PREFIX",
    "normalise",
    "parse_query",
    "phrase_words",
    "term_words",
]

# A search box line, not a document: Gmail's own box stops accepting near 1,500.
MAX_QUERY_LENGTH: Final = 1000
# Terms, bounds and has: words in one query; each costs an index lookup.
MAX_QUERY_TERMS: Final = 64
# Parentheses and negations inside one another; keeps compiled queries and the
# recursion that builds them shallow.
MAX_QUERY_DEPTH: Final = 16
# Letters a prefix search (``word*``) needs before its star: it expands to every
# indexed word it begins, and a shorter one matches much of a large archive's
# vocabulary, every user's, before the user's own rows are picked out.
MIN_PREFIX: Final = 3
# The largest size larger:/smaller: accept (1 PiB), so the octets fit any integer column.
MAX_SIZE_BOUND: Final = 1 << 50

# A word of the index: letters and digits (what FTS5's unicode61 and PostgreSQL's
# simple parser keep); everything else separates words.
_WORD: Final = re.compile(r"[^\W_]+")
_DATE: Final = re.compile(r"(\d{4})[-/](\d{1,2})[-/](\d{1,2})")
_SIZE: Final = re.compile(r"(\d{1,16})([kmg]?)b?", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_FIELDS: Final = {
    "from": TermField.FROM,
    "to": TermField.TO,
    "subject": TermField.SUBJECT,
    "body": TermField.BODY,
    "filename": TermField.FILENAME,
    "attachment": TermField.FILENAME,
}
_SPECIAL: Final = frozenset({"has", "before", "after", "larger", "smaller"})
_FIELD_NAME: Final = re.compile(r"[A-Za-z_]+")
# Characters that end a bare word.
_WORD_END: Final = re.compile(r'[\s()"]')


def normalise(text: str) -> str:
    """The one normal form of term text: NFKC (ligatures, full-width forms), casefold."""
    return unicodedata.normalize("NFKC", text).casefold()


def term_words(text: str) -> list[tuple[tuple[str, ...], bool]]:
    """A non-phrase term's text as its whitespace-separated words, each as the index
    words it holds (``alice@example.com`` is three, matched side by side) and whether
    it ends in ``*`` (a prefix). A phrase is one such word: pass it whole."""
    out: list[tuple[tuple[str, ...], bool]] = []
    for chunk in text.split():
        words = tuple(_WORD.findall(chunk))
        if words:
            out.append((words, chunk.endswith("*")))
    return out


def phrase_words(text: str) -> tuple[tuple[str, ...], bool]:
    """A phrase's index words in order, and whether its last word is a prefix."""
    return tuple(_WORD.findall(text)), text.rstrip().endswith("*")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    """"(", ")", "OR", "AND", "NOT", "-" or "atom"."""
    pos: int
    """0-based offset in the query text."""
    field: str | None = None
    """The field name before a colon (lower case), for an atom."""
    value: str = ""
    quoted: bool = False


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """The text of a quoted phrase opening at ``start``, and the offset after it."""
    end = text.find('"', start + 1)
    if end < 0:
        raise InvalidQuery(f"unclosed quote at {start + 1}")
    return text[start + 1 : end], end + 1


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "()":
            tokens.append(_Token(char, i))
            i += 1
        elif char == '"':
            value, end = _read_quoted(text, i)
            tokens.append(_Token("atom", i, value=value, quoted=True))
            i = end
        elif char == "-" and i + 1 < n and not text[i + 1].isspace() and text[i + 1] != ")":
            tokens.append(_Token("-", i))
            i += 1
        else:
            match = _WORD_END.search(text, i)
            end = match.start() if match else n
            word = text[i:end]
            name, colon, value = word.partition(":")
            if word in ("OR", "AND", "NOT"):
                tokens.append(_Token(word, i))
            elif colon and _FIELD_NAME.fullmatch(name) and not value.startswith("//"):
                field = name.lower()
                if field not in _FIELDS and field not in _SPECIAL:
                    raise InvalidQuery(f"unknown field '{name}:' at {i + 1}")
                quoted = False
                if not value and end < n and text[end] == '"':
                    value, end = _read_quoted(text, end)
                    quoted = True
                if not value:
                    raise InvalidQuery(f"nothing after '{name}:' at {i + 1}")
                tokens.append(_Token("atom", i, field=field, value=value, quoted=quoted))
            else:
                tokens.append(_Token("atom", i, value=word))
            i = end
    return tokens


def _day(token: _Token) -> float:
    match = _DATE.fullmatch(token.value)
    try:
        if match is None:
            raise ValueError(token.value)
        year, month, day = (int(group) for group in match.groups())
        moment = datetime.datetime(year, month, day, tzinfo=datetime.UTC)
    except ValueError:
        raise InvalidQuery(
            f"bad date '{token.field}:{token.value}' at {token.pos + 1} (use YYYY-MM-DD)"
        ) from None
    return moment.timestamp()


def _size(token: _Token) -> int:
    match = _SIZE.fullmatch(token.value)
    octets = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()] if match else -1
    if not 0 <= octets <= MAX_SIZE_BOUND:
        raise InvalidQuery(
            f"bad size '{token.field}:{token.value}' at {token.pos + 1} (use 100k, 5M, 1G)"
        )
    return octets


def _atom(token: _Token) -> Query | None:
    """One atom as a Query; None for a term without any word in it."""
    field = token.field
    if field == "has":
        if token.value.lower() != "attachment":
            raise InvalidQuery(f"unknown 'has:{token.value}' at {token.pos + 1}")
        return Has()
    if field in ("before", "after"):
        return DateBound(before=field == "before", moment=_day(token))
    if field in ("larger", "smaller"):
        return SizeBound(larger=field == "larger", octets=_size(token))
    text = normalise(token.value)
    if not _WORD.search(text):
        return None
    phrase = token.quoted and len(text.split()) > 1
    prefixes = [phrase_words(text)] if phrase else term_words(text)
    if any(prefix and len(words[-1]) < MIN_PREFIX for words, prefix in prefixes if words):
        raise InvalidQuery(
            f"prefix too short at {token.pos + 1} (at least {MIN_PREFIX} letters before '*')"
        )
    return Term(_FIELDS[field] if field else TermField.ANY, " ".join(text.split()), phrase)


class _Parser:
    """Recursive descent over the tokens: and := or (["AND"] or)*, or := unary ("OR"
    unary)*, unary := ("NOT" | "-") unary | "(" and ")" | atom."""

    def __init__(self, text: str, tokens: list[_Token]) -> None:
        self._text = text
        self._tokens = tokens
        self._at = 0
        self._terms = 0
        self._depth = 0

    def _peek(self) -> _Token | None:
        return self._tokens[self._at] if self._at < len(self._tokens) else None

    def parse(self) -> Query:
        result = self._and()
        token = self._peek()
        if token is not None:
            # Only a ")" stops _and before the end.
            raise InvalidQuery(f"unbalanced parenthesis: ')' at {token.pos + 1}")
        return MatchAll() if result is None else result

    def _and(self) -> Query | None:
        parts: list[Query] = []
        while (token := self._peek()) is not None and token.kind != ")":
            if token.kind == "AND":
                self._at += 1
                following = self._peek()
                if not parts or following is None or following.kind in (")", "AND", "OR"):
                    raise InvalidQuery(f"AND needs a term on each side at {token.pos + 1}")
                continue
            part = self._or()
            if part is not None:
                parts.append(part)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def _or(self) -> Query | None:
        parts = [self._unary()]
        while (token := self._peek()) is not None and token.kind == "OR":
            self._at += 1
            following = self._peek()
            if following is None or following.kind in (")", "AND", "OR"):
                raise InvalidQuery(f"OR needs a term on each side at {token.pos + 1}")
            parts.append(self._unary())
        kept = tuple(part for part in parts if part is not None)
        if not kept:
            return None
        return kept[0] if len(kept) == 1 else Or(kept)

    def _nest(self, token: _Token) -> None:
        self._depth += 1
        if self._depth > MAX_QUERY_DEPTH:
            raise InvalidQuery(
                f"nested too deep at {token.pos + 1} (at most {MAX_QUERY_DEPTH} levels)"
            )

    def _unary(self) -> Query | None:
        token = self._peek()
        assert token is not None  # callers check
        if token.kind == "OR":
            raise InvalidQuery(f"OR needs a term on each side at {token.pos + 1}")
        self._at += 1
        if token.kind in ("NOT", "-"):
            if self._peek() is None or self._peek_kind() in (")", "OR", "AND"):
                raise InvalidQuery(f"{token.kind} needs a term after it at {token.pos + 1}")
            self._nest(token)
            part = self._unary()
            self._depth -= 1
            return None if part is None else Not(part)
        if token.kind == "(":
            self._nest(token)
            part = self._and()
            closing = self._peek()
            if closing is None:
                raise InvalidQuery(f"unbalanced parenthesis: '(' at {token.pos + 1}")
            self._at += 1
            self._depth -= 1
            return part
        if token.kind == ")":
            raise InvalidQuery(f"unbalanced parenthesis: ')' at {token.pos + 1}")
        self._terms += 1
        if self._terms > MAX_QUERY_TERMS:
            raise InvalidQuery(f"too many terms (at most {MAX_QUERY_TERMS})")
        return _atom(token)

    def _peek_kind(self) -> str | None:
        token = self._peek()
        return None if token is None else token.kind


def parse_query(text: str) -> Query:
    """``text`` (what a user typed) as a Query; blank text is MatchAll.

    Raises InvalidQuery, with what and where, for anything it cannot read.
    """
    if len(text) > MAX_QUERY_LENGTH:
        raise InvalidQuery(f"query too long ({len(text)} characters, at most {MAX_QUERY_LENGTH})")
    return _Parser(text, _tokens(text)).parse()
