"""The POP3 protocol from the collector's side, sans-I/O: commands out, reply events in.

``ClientConnection`` turns each command into bytes to write and remembers what kind of
reply it expects, in order, so commands may be pipelined (RFC 2449 PIPELINING). Bytes
the server sends go in with ``receive_data``; ``next_event`` hands out parsed replies
(popbox.proto.client_events). Reply lines are read by a ``LineReader`` and message
bodies (RETR, TOP) by a ``WireDecoder``, both from one receive buffer, and come out as
a stream of ``MessageData`` chunks, un-dot-stuffed, never whole. Everything the server
sends is bounded (line length, entries of a listing, sizes); a server that breaks the
protocol or a bound raises ProtocolError, and nothing else escapes the parser whatever
bytes arrive. The SASL responses and the APOP digest are popbox.proto.sasl's.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from popbox.errors import LineTooLong, ProtocolError
from popbox.proto.client_events import (
    NEED_DATA,
    Capabilities,
    ConnectionClosed,
    Continuation,
    ErrReply,
    Event,
    Greeting,
    MessageData,
    MessageEnd,
    NeedData,
    OkReply,
    ScanListing,
    StatReply,
    UidListing,
)
from popbox.proto.lines import LineReader, LineTooLongMarker
from popbox.proto.sasl import decode_challenge
from popbox.proto.wire import WireDecoder

__all__ = [
    "MAX_CHALLENGE_LINE",
    "MAX_REPLY_LINE",
    "NEED_DATA",
    "Capabilities",
    "ClientConnection",
    "ConnectionClosed",
    "Continuation",
    "ErrReply",
    "Event",
    "Greeting",
    "MessageData",
    "MessageEnd",
    "NeedData",
    "OkReply",
    "ScanListing",
    "StatReply",
    "UidListing",
    "valid_uidl",
]

# RFC 2449 section 4 caps responses at 512 octets; real servers send longer CAPA SASL
# lines and greetings, so we allow 4 KiB and stop there (memory stays bounded).
MAX_REPLY_LINE: Final = 4096
# SASL challenges carry JSON error documents (XOAUTH2) of a few hundred octets; 16 KiB
# matches the server side's MAX_SASL_LINE.
MAX_CHALLENGE_LINE: Final = 16384
# Entries in one UIDL/LIST listing. Half a million messages is far past any maildrop a
# POP3 client can usefully walk; a server sending more is broken or hostile.
MAX_LISTING_ENTRIES: Final = 500_000
# Lines in a CAPA reply; RFC 2449 registers a dozen capabilities.
MAX_CAPABILITIES: Final = 256
# A message size above 4 GiB is not a POP3 message (sizes are counted in RAM by servers).
MAX_REPORTED_SIZE: Final = 1 << 32
# RFC 1939 section 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UIDL_LENGTH: Final = 70
# RFC 5034 section 4: an AUTH command line with its initial response is at most 255
# octets; longer responses (OAuth2 tokens) must go in the two-step form.
MAX_AUTH_COMMAND: Final = 255

_UIDL_CHARS: Final = re.compile(rb"^[\x21-\x7e]{1,70}$")
_RESP_CODE: Final = re.compile(r"^\[([A-Za-z0-9/._-]{1,64})\]\s?")
# RFC 1939 section 7: a msg-id in angle brackets, e.g. <1896.697170952@dbc.mtview.ca.us>.
_APOP_TIMESTAMP: Final = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")


def valid_uidl(uidl: bytes | str) -> bool:
    """True for a unique-id RFC 1939 allows: 1-70 characters 0x21-0x7E."""
    raw = uidl.encode("latin-1", "replace") if isinstance(uidl, str) else uidl
    return bool(_UIDL_CHARS.match(raw))


# ---------------------------------------------------------------------------- parsing


class _Kind(Enum):
    GREETING = auto()
    SIMPLE = auto()
    AUTH = auto()
    STAT = auto()
    CAPA = auto()
    LIST = auto()
    UIDL = auto()
    BODY = auto()


@dataclass(slots=True)
class _Expect:
    kind: _Kind
    command: str
    number: int = 0


def _split_status(line: str) -> tuple[bool, str, str | None]:
    """``+OK text`` / ``-ERR [CODE] text`` -> (ok, text, code)."""
    if line.startswith("+OK"):
        rest, ok = line[3:], True
    elif line.startswith("-ERR"):
        rest, ok = line[4:], False
    else:
        raise ProtocolError(f"reply is neither +OK nor -ERR: {line[:80]!r}")
    if rest and not rest.startswith(" "):
        raise ProtocolError(f"malformed status line: {line[:80]!r}")
    text = rest.strip()
    code = None
    match = _RESP_CODE.match(text)
    if match:
        code = match.group(1).upper()
        text = text[match.end() :]
    return ok, text, code


def _number(token: str, what: str, limit: int) -> int:
    if not token.isdigit() or not token.isascii() or len(token) > 12:
        raise ProtocolError(f"{what} is not a number: {token[:40]!r}")
    value = int(token)
    if value > limit:
        raise ProtocolError(f"{what} {value} is beyond the limit {limit}")
    return value


class ClientConnection:
    """One POP3 session from the client's side, without I/O."""

    def __init__(
        self,
        *,
        max_line: int = MAX_REPLY_LINE,
        max_entries: int = MAX_LISTING_ENTRIES,
    ) -> None:
        self._max_line = max_line
        self._max_entries = max_entries
        # One receive buffer: reply lines leave it through the line reader, a body
        # straight through its decoder, so that neither copies what the other reads.
        self._received = bytearray()
        self._reader = LineReader(max(max_line, MAX_CHALLENGE_LINE), shared=self._received)
        self._expected: deque[_Expect] = deque([_Expect(_Kind.GREETING, "greeting")])
        self._lines: list[str] = []
        self._collecting: _Expect | None = None
        # Inside a RETR/TOP body: its decoder, and the command it answers.
        self._body: WireDecoder | None = None
        self._body_expect = _Expect(_Kind.BODY, "RETR")
        self._owed_end: MessageEnd | None = None
        self._closed = False
        self._close_reported = False

    # ---------------------------------------------------------------- commands

    @property
    def pending(self) -> int:
        """Replies still expected (commands in flight)."""
        return len(self._expected)

    @property
    def busy(self) -> bool:
        """True while replies or the rest of a message body are still to come."""
        return bool(self._expected) or self._body is not None or self._owed_end is not None

    def _command(self, kind: _Kind, verb: str, *args: str, number: int = 0) -> bytes:
        line = " ".join((verb, *args))
        if "\r" in line or "\n" in line or "\0" in line:
            # A CR/LF in a username or password would smuggle a second command.
            raise ValueError(f"refusing to send {verb} with a line break in it")
        self._expected.append(_Expect(kind, verb, number))
        return line.encode("utf-8") + b"\r\n"

    def capa(self) -> bytes:
        return self._command(_Kind.CAPA, "CAPA")

    def stls(self) -> bytes:
        return self._command(_Kind.SIMPLE, "STLS")

    def user(self, name: str) -> bytes:
        return self._command(_Kind.SIMPLE, "USER", name)

    def pass_(self, password: str) -> bytes:
        return self._command(_Kind.SIMPLE, "PASS", password)

    def apop(self, name: str, digest: str) -> bytes:
        return self._command(_Kind.SIMPLE, "APOP", name, digest)

    def auth(self, mechanism: str, initial: bytes | None = None) -> bytes:
        """``AUTH MECH`` with the initial response inline when it fits RFC 5034's limit;
        otherwise the caller answers the first ``Continuation`` with ``sasl_response``."""
        if initial is not None:
            encoded = base64.b64encode(initial).decode("ascii") or "="
            if len(mechanism) + len(encoded) + 7 <= MAX_AUTH_COMMAND:
                return self._command(_Kind.AUTH, "AUTH", mechanism, encoded)
        return self._command(_Kind.AUTH, "AUTH", mechanism)

    def auth_fits_inline(self, mechanism: str, initial: bytes) -> bool:
        encoded_length = len(base64.b64encode(initial)) or 1
        return len(mechanism) + encoded_length + 7 <= MAX_AUTH_COMMAND

    def sasl_response(self, data: bytes) -> bytes:
        """Answer a challenge; an empty response is an empty line (XOAUTH2's error
        challenge wants exactly that)."""
        if not self._expected or self._expected[0].kind is not _Kind.AUTH:
            raise RuntimeError("no SASL exchange in progress")
        return base64.b64encode(data) + b"\r\n"

    def sasl_cancel(self) -> bytes:
        return b"*\r\n"

    def stat(self) -> bytes:
        return self._command(_Kind.STAT, "STAT")

    def list_all(self) -> bytes:
        return self._command(_Kind.LIST, "LIST")

    def uidl_all(self) -> bytes:
        return self._command(_Kind.UIDL, "UIDL")

    def retr(self, number: int) -> bytes:
        return self._command(_Kind.BODY, "RETR", str(number), number=number)

    def top(self, number: int, lines: int) -> bytes:
        return self._command(_Kind.BODY, "TOP", str(number), str(lines), number=number)

    def dele(self, number: int) -> bytes:
        return self._command(_Kind.SIMPLE, "DELE", str(number), number=number)

    def noop(self) -> bytes:
        return self._command(_Kind.SIMPLE, "NOOP")

    def rset(self) -> bytes:
        return self._command(_Kind.SIMPLE, "RSET")

    def quit(self) -> bytes:
        return self._command(_Kind.SIMPLE, "QUIT")

    def start_tls(self) -> None:
        """Call after STLS's +OK, before the handshake. Bytes the server sent after the
        +OK in plaintext would be injected into the TLS session; refuse them."""
        if self._reader.buffered or self._expected:
            raise ProtocolError("data after STLS's +OK before the TLS handshake")

    # ---------------------------------------------------------------- replies

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means it closed the connection."""
        if not data:
            self._closed = True
            return
        self._reader.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next reply event, or NEED_DATA; ConnectionClosed once the server has
        closed and every reply before that is out. Raises only ProtocolError."""
        if self._owed_end is not None:
            end, self._owed_end = self._owed_end, None
            return end
        if self._body is not None:
            return self._next_body_event(self._body)
        while True:
            line = self._read_line()
            if line is None:
                if self._closed:
                    if self._close_reported:
                        raise ProtocolError("connection already closed")
                    self._close_reported = True
                    return ConnectionClosed()
                return NEED_DATA
            if self._collecting is None:
                return self._status_line(line)
            # A listing: loop rather than recurse, it may run to MAX_LISTING_ENTRIES.
            event = self._collect_line(line)
            if event is not None:
                return event

    def _status_line(self, line: str) -> Event | NeedData:
        if not self._expected:
            raise ProtocolError(f"unsolicited reply: {line[:80]!r}")
        expect = self._expected[0]
        if expect.kind is _Kind.AUTH and line.startswith("+") and not line.startswith("+OK"):
            return self._continuation(line)
        ok, text, code = _split_status(line)
        self._expected.popleft()
        if not ok:
            return ErrReply(expect.command, text, code)
        if expect.kind is _Kind.GREETING:
            match = _APOP_TIMESTAMP.search(text)
            return Greeting(text, match.group(0) if match else None)
        if expect.kind is _Kind.STAT:
            return self._stat(text)
        if expect.kind in (_Kind.CAPA, _Kind.LIST, _Kind.UIDL):
            self._collecting = expect
            self._lines = []
            return self.next_event()
        if expect.kind is _Kind.BODY:
            self._body = WireDecoder()
            self._body_expect = expect
        return OkReply(expect.command, text, code)

    def _read_line(self) -> str | None:
        limit = MAX_CHALLENGE_LINE if self._in_sasl() else self._max_line
        raw = self._reader.read_line(limit)
        if isinstance(raw, LineTooLongMarker):
            raise LineTooLong(f"reply line longer than {limit} octets")
        if raw is None:
            return None
        # Servers send text in any charset; replace, never fail on it.
        return raw.decode("utf-8", "replace")

    def _in_sasl(self) -> bool:
        return bool(self._expected) and self._expected[0].kind is _Kind.AUTH

    def _continuation(self, line: str) -> Continuation:
        data = decode_challenge(line[1:].strip())
        if data is None:
            raise ProtocolError("SASL challenge is not base64")
        return Continuation(data)

    def _stat(self, text: str) -> StatReply:
        parts = text.split()
        if len(parts) < 2:
            raise ProtocolError(f"malformed STAT reply: {text[:80]!r}")
        count = _number(parts[0], "message count", self._max_entries)
        size = _number(parts[1], "maildrop size", MAX_REPORTED_SIZE * self._max_entries)
        return StatReply(count, size)

    def _collect_line(self, line: str) -> Event | None:
        assert self._collecting is not None
        if line != ".":
            if line.startswith("."):
                line = line[1:]
            limit = MAX_CAPABILITIES if self._collecting.kind is _Kind.CAPA else self._max_entries
            if len(self._lines) >= limit:
                raise ProtocolError(f"{self._collecting.command} listing exceeds {limit}")
            self._lines.append(line)
            return None
        kind, lines = self._collecting.kind, self._lines
        self._collecting, self._lines = None, []
        if kind is _Kind.CAPA:
            items: dict[str, tuple[str, ...]] = {}
            for entry in lines:
                words = entry.split()
                if words:
                    items[words[0].upper()] = tuple(words[1:])
            return Capabilities(items)
        if kind is _Kind.LIST:
            sizes = [
                (number, _number(value, "message size", MAX_REPORTED_SIZE))
                for number, value in self._pairs(lines, "LIST")
            ]
            return ScanListing(tuple(sizes))
        return self._uid_listing(lines)

    def _pairs(self, lines: list[str], what: str) -> list[tuple[int, str]]:
        pairs: list[tuple[int, str]] = []
        seen: set[int] = set()
        for entry in lines:
            words = entry.split()
            if len(words) < 2:
                raise ProtocolError(f"malformed {what} line: {entry[:80]!r}")
            number = _number(words[0], "message number", self._max_entries)
            if number < 1 or number in seen:
                raise ProtocolError(f"{what} repeats or invalid message number {number}")
            seen.add(number)
            pairs.append((number, words[1]))
        return pairs

    def _uid_listing(self, lines: list[str]) -> UidListing:
        entries: list[tuple[int, str]] = []
        problems: list[str] = []
        seen: set[str] = set()
        for number, uidl in self._pairs(lines, "UIDL"):
            if not valid_uidl(uidl):
                problems.append(f"message {number}: invalid unique-id")
            elif uidl in seen:
                problems.append(f"message {number}: duplicate unique-id")
            seen.add(uidl)
            entries.append((number, uidl))
        return UidListing(tuple(entries), tuple(problems[:20]))

    def _next_body_event(self, decoder: WireDecoder) -> Event | NeedData:
        """The next piece of a body, decoded straight from the receive buffer."""
        data = decoder.decode_from(self._received)
        if decoder.finished:
            self._body = None
            end = MessageEnd(self._body_expect.command, self._body_expect.number)
            if not data:
                return end
            self._owed_end = end
            return MessageData(data)
        if data:
            return MessageData(data)
        if self._closed:
            raise ProtocolError("connection closed in the middle of a message")
        return NEED_DATA
