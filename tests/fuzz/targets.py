"""Fuzz targets for the parsers that read hostile bytes.

Targets: ``commands`` (framing + the command parser, and the whole server core fed the
bytes), ``sasl`` (the base64 decoder and the PLAIN/LOGIN mechanisms) and ``client``
(the collector's response parser, popbox.proto.client, after each kind of command).
A finding is any exception other than the documented refusal, or a broken invariant.
Run them with atheris through run_atheris.py; test_fuzz.py replays the seed corpus
and runs them under hypothesis when atheris is missing.
"""

from __future__ import annotations

from collections.abc import Callable

from popbox.errors import ProtocolError
from popbox.proto.client import NEED_DATA as CLIENT_NEED_DATA
from popbox.proto.client import ClientConnection
from popbox.proto.commands import BadCommand, Command, parse_command
from popbox.proto.events import (
    FLUSH,
    NEED_DATA,
    ApopRequest,
    CloseConnection,
    ConnectionClosed,
    LoginRequest,
    StartTls,
)
from popbox.proto.lines import LineReader, LineTooLongMarker
from popbox.proto.sasl import Challenge, Credentials, SaslFailure, decode_response, new_mechanism
from popbox.proto.server import ServerConnection, ServerSettings

# The core's own bound on one command line (RFC 2449's 255 octets, as configured).
LINE_LIMIT = 2048


def fuzz_commands(data: bytes) -> None:
    """Framing and parsing never raise, never buffer past the limit, always decide."""
    reader = LineReader(hard_limit=LINE_LIMIT)
    for start in range(0, len(data), 61):
        reader.feed(data[start : start + 61])
        while True:
            line = reader.read_line(LINE_LIMIT)
            if line is None:
                break
            if isinstance(line, LineTooLongMarker):
                continue
            assert len(line) <= LINE_LIMIT
            result = parse_command(line)
            assert isinstance(result, Command | BadCommand)
        # What is left is one partial line: never more than the limit.
        assert reader.buffered <= LINE_LIMIT
    # The same bytes through the whole core: only replies and closing, no exception.
    conn = ServerConnection(
        ServerSettings(), tls_active=False, stls_available=True, plaintext_auth_allowed=True
    )
    conn.receive_data(data)
    conn.receive_data(b"")
    for _ in range(100_000):
        event = conn.next_event()
        out = conn.data_to_send()
        assert not out or out.startswith((b"+OK", b"-ERR", b"+ ")) or b"\r\n" in out
        if event is NEED_DATA or isinstance(event, CloseConnection | ConnectionClosed):
            return
        if event is FLUSH:
            continue
        # A login or STLS request needs the glue: refuse the login, finish the STLS.
        if isinstance(event, LoginRequest | ApopRequest):
            conn.login_failed("AUTH", "Authentication failed.")
        elif isinstance(event, StartTls):
            conn.tls_established()
        else:
            raise AssertionError(f"unexpected event before login: {event!r}")
    raise AssertionError("the core never asked for more data")


def fuzz_sasl(data: bytes) -> None:
    """Base64 decoding is strict and total; mechanisms end in a step, never raise."""
    decoded = decode_response(data)
    assert decoded is None or isinstance(decoded, bytes)
    for name in ("PLAIN", "LOGIN"):
        mechanism = new_mechanism(name)
        assert mechanism is not None
        step = mechanism.start(decoded)
        for _ in range(3):
            if not isinstance(step, Challenge):
                break
            step = mechanism.respond(data)
        assert isinstance(step, Challenge | Credentials | SaslFailure)


_CLIENT_COMMANDS: list[Callable[[ClientConnection], bytes]] = [
    lambda c: c.capa(),
    lambda c: c.stat(),
    lambda c: c.list_all(),
    lambda c: c.uidl_all(),
    lambda c: c.retr(1),
    lambda c: c.top(1, 0),
    lambda c: c.auth("PLAIN"),
    lambda c: c.noop(),
]


def fuzz_client(data: bytes) -> None:
    """The collector's parser: any server bytes end in an event or ProtocolError."""
    if not data:
        return
    command = _CLIENT_COMMANDS[data[0] % len(_CLIENT_COMMANDS)]
    conn = ClientConnection(max_line=1024, max_entries=100)
    command(conn)
    try:
        for start in range(1, len(data), 97):
            conn.receive_data(data[start : start + 97])
            for _ in range(10_000):
                event = conn.next_event()
                if event is CLIENT_NEED_DATA or isinstance(event, ConnectionClosed):
                    break
            else:
                raise AssertionError("the client parser never asked for more data")
        conn.receive_data(b"")
        conn.next_event()
    except ProtocolError:
        pass  # the documented refusal of a misbehaving server


TARGETS: dict[str, Callable[[bytes], None]] = {
    "commands": fuzz_commands,
    "sasl": fuzz_sasl,
    "client": fuzz_client,
}
