"""One POP3 command line -> one ``Command`` or a ``BadCommand`` (RFC 1939, 2449, 5034,
6856).

The parser never raises: any byte string comes back as a command or as the reason it
is not one, which the server turns into ``-ERR``. It checks only grammar; whether a
command is allowed now, and whether a message number exists, is the server's business.
"""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass
from typing import Final, NewType

__all__ = [
    "HUGE_NUMBER",
    "BadCommand",
    "Command",
    "MessageNumber",
    "Verb",
    "parse_command",
]

MessageNumber = NewType("MessageNumber", int)
"""The 1-based number a client uses for a message; fixed for the session."""

# Any number with more digits than this is beyond every maildrop (and beyond int()'s
# digit limit for huge inputs), so it is clamped here instead of being converted.
_MAX_DIGITS: Final = 12
# What an over-long number (message number or TOP line count) is clamped to.
HUGE_NUMBER: Final = 10**_MAX_DIGITS
# RFC 2449 section 4: keywords are at most 4 octets in RFC 1939 and at most 40 in
# extensions; anything longer is garbage, not an unknown extension.
_MAX_KEYWORD: Final = 40
_ASCII_DIGITS: Final = frozenset(b"0123456789")
# RFC 4647 section 2.1: a basic range is subtags of up to 8 characters; 64 covers
# every registered tag with its extensions (RFC 5646 section 4.4.1 suggests 35).
_MAX_LANGUAGE_RANGE: Final = 64
_KEYWORD_OCTETS: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_0123456789"
)


class Verb(enum.Enum):
    """The POP3 commands popbox knows."""

    # Enum's own __hash__ is Python code (hash of the name); members are singletons
    # compared by identity, so the identity hash is equal-consistent and keeps the
    # per-command state-table and handler lookups in C.
    __hash__ = object.__hash__

    USER = "USER"
    PASS = "PASS"  # noqa: S105 - a command keyword, not a password
    APOP = "APOP"
    AUTH = "AUTH"
    STLS = "STLS"
    CAPA = "CAPA"
    STAT = "STAT"
    LIST = "LIST"
    UIDL = "UIDL"
    RETR = "RETR"
    TOP = "TOP"
    DELE = "DELE"
    NOOP = "NOOP"
    RSET = "RSET"
    QUIT = "QUIT"
    UTF8 = "UTF8"
    LANG = "LANG"


@dataclass(frozen=True, slots=True)
class Command:
    """A grammatically valid command; only the fields its verb uses are set."""

    verb: Verb
    number: MessageNumber | None = None
    """LIST/UIDL (optional), RETR, TOP, DELE: the message number as written."""
    lines: int | None = None
    """TOP: body lines wanted, clamped to HUGE_NUMBER."""
    name: str | None = None
    """USER and APOP: the username (NFC, RFC 6856 section 2); AUTH: the mechanism,
    upper-cased; LANG: the language range asked for (RFC 4647), as sent."""
    secret: str | None = None
    """PASS: the password (the rest of the line); APOP: the digest, lower-cased."""
    initial_response: bytes | None = None
    """AUTH: the initial response as sent (base64 text, or b"=" for an empty one)."""


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A line that is not a valid command; ``reason`` is the text of the -ERR."""

    reason: str
    unknown: bool = False
    """True when the keyword itself is not a command we know."""


def _number(text: bytes) -> int | None:
    """Decimal digits only: no sign, no space, no non-ASCII digits (Arabic-Indic...)."""
    if not text or not _ASCII_DIGITS.issuperset(text):
        return None
    stripped = text.lstrip(b"0")
    if len(stripped) > _MAX_DIGITS:
        return HUGE_NUMBER
    return int(stripped or b"0")


def _text(raw: bytes) -> str | None:
    """UTF-8 text without control characters, or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        return None
    return text


def _name(raw: bytes) -> str | None:
    """A user name: UTF-8 text in Unicode NFC (RFC 6856 section 2 and RFC 5198), so
    that a name typed on a keyboard that composes differently is the same name."""
    text = _text(raw)
    if text is None or text.isascii():
        return text
    return unicodedata.normalize("NFC", text)


def _language_range(raw: bytes) -> str | None:
    """``*`` or a basic language range (RFC 4647 section 2.1), or None."""
    if raw == b"*":
        return "*"
    if len(raw) > _MAX_LANGUAGE_RANGE or not raw.isascii():
        return None
    parts = raw.decode("ascii").split("-")
    if not all(0 < len(part) <= 8 and part.isalnum() for part in parts) or not parts[0].isalpha():
        return None
    return "-".join(parts)


def _message_number(verb: Verb, arg: bytes) -> Command | BadCommand:
    number = _number(arg)
    if number is None:
        return BadCommand("Invalid message number")
    return Command(verb, number=MessageNumber(number))


def _parse_args(verb: Verb, rest: bytes, args: list[bytes]) -> Command | BadCommand:
    if verb in (Verb.STLS, Verb.CAPA, Verb.STAT, Verb.NOOP, Verb.RSET, Verb.QUIT, Verb.UTF8):
        if args:
            return BadCommand(f"{verb.value} takes no arguments")
        return Command(verb)
    if verb in (Verb.LIST, Verb.UIDL):
        if not args:
            return Command(verb)
        if len(args) > 1:
            return BadCommand(f"{verb.value} takes at most one argument")
        return _message_number(verb, args[0])
    if verb in (Verb.RETR, Verb.DELE):
        if len(args) != 1:
            return BadCommand(f"{verb.value} takes one message number")
        return _message_number(verb, args[0])
    if verb is Verb.TOP:
        if len(args) != 2:
            return BadCommand("TOP takes a message number and a line count")
        number, lines = _number(args[0]), _number(args[1])
        if number is None:
            return BadCommand("Invalid message number")
        if lines is None:
            return BadCommand("Invalid line count")
        return Command(verb, number=MessageNumber(number), lines=lines)
    if verb is Verb.LANG:
        if not args:
            return Command(verb)
        language = _language_range(args[0]) if len(args) == 1 else None
        if language is None:
            return BadCommand("LANG takes one language range")
        return Command(verb, name=language)
    if verb is Verb.USER:
        if len(args) != 1:
            return BadCommand("USER takes one name")
        name = _name(args[0])
        if name is None:
            return BadCommand("Invalid user name")
        return Command(verb, name=name)
    if verb is Verb.PASS:
        # The password is the rest of the line, spaces included (as Dovecot does):
        # passwords with spaces are real and RFC 1939 section 7 allows it.
        if not rest:
            return BadCommand("PASS takes a password")
        password = _text(rest)
        if password is None:
            return BadCommand("Invalid password")
        return Command(verb, secret=password)
    if verb is Verb.APOP:
        if len(args) != 2:
            return BadCommand("APOP takes a name and a digest")
        name = _name(args[0])
        digest = args[1].lower()
        if name is None:
            return BadCommand("Invalid user name")
        if len(digest) != 32 or not frozenset(b"0123456789abcdef").issuperset(digest):
            return BadCommand("Invalid APOP digest")
        return Command(verb, name=name, secret=digest.decode("ascii"))
    # AUTH [mechanism [initial-response]] (RFC 5034 section 4)
    if len(args) > 2:
        return BadCommand("AUTH takes a mechanism and an optional initial response")
    if not args:
        return Command(verb)
    if not _KEYWORD_OCTETS.issuperset(args[0]):
        return BadCommand("Invalid mechanism name")
    mechanism = args[0].decode("ascii").upper()
    initial = args[1] if len(args) == 2 else None
    return Command(verb, name=mechanism, initial_response=initial)


# Pipelining clients send the same few lines over and over (STAT, NOOP, LIST 1, RETR
# 7): a parsed command is immutable, so the lines of the verbs below are parsed once
# per process. Only verbs without credentials or names are kept, and the cache is
# emptied when full so that a client cycling through numbers cannot grow it.
_CACHEABLE: Final = frozenset(
    {"STAT", "NOOP", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "QUIT", "CAPA", "STLS", "UTF8"}
)
_CACHE_SIZE: Final = 4096
_parsed: dict[bytes, Command] = {}


def parse_command(line: bytes) -> Command | BadCommand:
    """Parse one line (without its CRLF). Never raises."""
    cached = _parsed.get(line)
    if cached is not None:
        return cached
    command = _parse_uncached(line)
    if isinstance(command, Command) and command.verb.value in _CACHEABLE:
        if len(_parsed) >= _CACHE_SIZE:
            _parsed.clear()
        _parsed[line] = command
    return command


def _parse_uncached(line: bytes) -> Command | BadCommand:
    if b"\0" in line:
        return BadCommand("NUL in command line")
    keyword, _, rest = line.partition(b" ")
    if not keyword:
        return BadCommand("Empty command" if not line.strip() else "Invalid command")
    if len(keyword) > _MAX_KEYWORD or not _KEYWORD_OCTETS.issuperset(keyword):
        return BadCommand("Unknown command", unknown=True)
    try:
        verb = Verb(keyword.decode("ascii").upper())
    except ValueError:
        return BadCommand("Unknown command", unknown=True)
    return _parse_args(verb, rest, rest.split())
