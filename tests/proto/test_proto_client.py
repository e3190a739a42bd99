"""Transcripts and fuzzing of the sans-I/O POP3 client (popbox.proto.client).

The SASL responses it sends are tested in test_proto_sasl.py, the body decoder alone in
test_proto_wire_decoder.py; here they are seen through the client's events.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.errors import LineTooLong, ProtocolError
from popbox.proto.client import (
    MAX_CHALLENGE_LINE,
    MAX_REPLY_LINE,
    NEED_DATA,
    Capabilities,
    ClientConnection,
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
    valid_uidl,
)
from popbox.proto.sasl import plain_response, xoauth2_response


def drain(conn: ClientConnection) -> list[Event]:
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def greeted(greeting: bytes = b"+OK ready\r\n") -> ClientConnection:
    conn = ClientConnection()
    conn.receive_data(greeting)
    assert isinstance(drain(conn)[0], Greeting)
    return conn


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, MessageData))


def test_greeting_carries_the_apop_timestamp() -> None:
    conn = ClientConnection()
    conn.receive_data(b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n")
    [event] = drain(conn)
    assert event == Greeting(
        "POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
        "<1896.697170952@dbc.mtview.ca.us>",
    )


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"-ERR [IN-USE] locked\r\n", "IN-USE"),
        (b"-ERR [LOGIN-DELAY] wait\r\n", "LOGIN-DELAY"),
        (b"-ERR [SYS/TEMP] try later\r\n", "SYS/TEMP"),
        (b"-ERR [SYS/PERM] broken\r\n", "SYS/PERM"),
        (b"-ERR [AUTH] bad password\r\n", "AUTH"),
        (b"-ERR plain failure\r\n", None),
    ],
)
def test_err_reply_response_codes(line: bytes, code: str | None) -> None:
    conn = greeted()
    conn.user("a")
    conn.receive_data(line)
    [event] = drain(conn)
    assert isinstance(event, ErrReply)
    assert event.code == code
    assert event.command == "USER"


def test_pipelined_listings_come_back_in_order() -> None:
    conn = greeted()
    sent = conn.capa() + conn.uidl_all() + conn.list_all() + conn.stat()
    assert sent == b"CAPA\r\nUIDL\r\nLIST\r\nSTAT\r\n"
    conn.receive_data(
        b"+OK\r\nUIDL\r\nPIPELINING\r\nSASL PLAIN xoauth2\r\n.\r\n"
        b"+OK\r\n1 abc\r\n2 def\r\n.\r\n+OK\r\n1 10\r\n2 20\r\n.\r\n+OK 2 30\r\n"
    )
    capa, uidl, scan, stat = drain(conn)
    assert isinstance(capa, Capabilities)
    assert "pipelining" in capa
    assert capa.sasl_mechanisms() == {"PLAIN", "XOAUTH2"}
    assert uidl == UidListing(((1, "abc"), (2, "def")))
    assert scan == ScanListing(((1, 10), (2, 20)))
    assert stat == StatReply(2, 30)
    assert conn.pending == 0


def test_uidl_problems_are_reported_not_raised() -> None:
    conn = greeted()
    conn.uidl_all()
    conn.receive_data(b"+OK\r\n1 abc\r\n2 abc\r\n3 " + b"x" * 71 + b"\r\n.\r\n")
    [event] = drain(conn)
    assert isinstance(event, UidListing)
    assert len(event.problems) == 2
    assert not valid_uidl("x" * 71)
    assert valid_uidl("x" * 70)


def test_retr_unstuffs_across_every_chunk_boundary() -> None:
    message = b"From: a\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
    wire = (
        b"+OK 40 octets\r\n"
        + message.replace(b"\r\n.", b"\r\n..").replace(b"From", b"From", 1)
        + b".\r\n+OK bye\r\n"
    )
    for split in range(1, len(wire)):
        conn = greeted()
        conn.retr(1)
        conn.quit()
        events: list[Event] = []
        for piece in (wire[:split], wire[split:]):
            conn.receive_data(piece)
            events += drain(conn)
        assert body_of(events) == message, split
        kinds = [type(e) for e in events if not isinstance(e, MessageData)]
        assert kinds == [OkReply, MessageEnd, OkReply]


def test_body_that_starts_with_a_dot_and_empty_body() -> None:
    conn = greeted()
    conn.retr(1)
    conn.retr(2)
    conn.receive_data(b"+OK\r\n..x\r\n.\r\n+OK\r\n.\r\n")
    events = drain(conn)
    ends = [i for i, e in enumerate(events) if isinstance(e, MessageEnd)]
    assert body_of(events[: ends[0]]) == b".x\r\n"
    assert body_of(events[ends[0] :]) == b""


def test_retr_err_has_no_body() -> None:
    conn = greeted()
    conn.retr(9)
    conn.noop()
    conn.receive_data(b"-ERR no such message\r\n+OK\r\n")
    assert [type(e) for e in drain(conn)] == [ErrReply, OkReply]


def test_overlong_line_is_refused_without_buffering_forever() -> None:
    conn = greeted()
    conn.noop()
    conn.receive_data(b"+OK " + b"a" * 5000)
    with pytest.raises(LineTooLong):
        conn.next_event()


def test_listing_bounded_by_max_entries() -> None:
    conn = ClientConnection(max_entries=3)
    conn.receive_data(b"+OK\r\n")
    drain(conn)
    conn.uidl_all()
    conn.receive_data(b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n4 d\r\n.\r\n")
    with pytest.raises(ProtocolError):
        drain(conn)


def test_huge_size_is_refused() -> None:
    conn = greeted()
    conn.list_all()
    conn.receive_data(b"+OK\r\n1 99999999999\r\n.\r\n")
    with pytest.raises(ProtocolError):
        drain(conn)


def test_unsolicited_reply_is_a_protocol_violation() -> None:
    conn = greeted()
    conn.receive_data(b"+OK surprise\r\n")
    with pytest.raises(ProtocolError):
        drain(conn)


def test_data_injected_after_stls_ok_is_refused() -> None:
    conn = greeted()
    conn.stls()
    conn.receive_data(b"+OK begin TLS\r\n+OK injected\r\n")
    assert isinstance(conn.next_event(), OkReply)
    with pytest.raises(ProtocolError):
        conn.start_tls()


def test_command_injection_through_username_is_refused() -> None:
    conn = greeted()
    with pytest.raises(ValueError, match="refusing to send USER"):
        conn.user("bob\r\nDELE 1")
    assert conn.pending == 0  # nothing was queued for the refused command


def test_closed_mid_message_is_an_error() -> None:
    conn = greeted()
    conn.retr(1)
    conn.receive_data(b"+OK\r\npartial")
    drain(conn)
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        drain(conn)


def test_xoauth2_two_step_and_error_challenge() -> None:
    conn = greeted()
    token = "t" * 2000
    initial = xoauth2_response("user@example.com", token)
    assert initial == f"user=user@example.com\x01auth=Bearer {token}\x01\x01".encode()
    assert not conn.auth_fits_inline("XOAUTH2", initial)
    assert conn.auth("XOAUTH2", initial) == b"AUTH XOAUTH2\r\n"
    conn.receive_data(b"+ \r\n")
    assert drain(conn) == [Continuation(b"")]
    assert base64.b64decode(conn.sasl_response(initial)) == initial
    error = base64.b64encode(b'{"status":"401"}')
    conn.receive_data(b"+ " + error + b"\r\n")
    assert drain(conn) == [Continuation(b'{"status":"401"}')]
    assert conn.sasl_response(b"") == b"\r\n"
    conn.receive_data(b"-ERR [AUTH] invalid token\r\n")
    assert drain(conn) == [ErrReply("AUTH", "invalid token", "AUTH")]


def test_plain_goes_inline_when_it_fits() -> None:
    conn = greeted()
    initial = plain_response("bob", "secret")
    line = conn.auth("PLAIN", initial)
    assert line == b"AUTH PLAIN " + base64.b64encode(b"\0bob\0secret") + b"\r\n"


_COMMANDS = st.lists(
    st.sampled_from(["capa", "uidl", "list", "stat", "retr", "top", "noop", "auth"]),
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(commands=_COMMANDS, chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_server_bytes_raise_only_protocol_error(
    commands: list[str], chunks: list[bytes]
) -> None:
    conn = ClientConnection(max_line=256, max_entries=50)
    for name in commands:
        if name == "retr":
            conn.retr(1)
        elif name == "top":
            conn.top(1, 0)
        elif name == "auth":
            conn.auth("PLAIN")
        else:
            getattr(conn, {"uidl": "uidl_all", "list": "list_all"}.get(name, name))()
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            for _ in range(10_000):
                event = conn.next_event()
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        max_size=20,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_any_body_round_trips_through_dot_stuffing(lines: list[bytes], cuts: list[int]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    wire = b"+OK\r\n" + stuffed + b".\r\n"
    conn = greeted()
    conn.retr(1)
    events: list[Event] = []
    previous = 0
    for cut in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
        if cut <= previous:
            continue
        conn.receive_data(wire[previous:cut])
        previous = cut
        events += drain(conn)
    assert body_of(events) == message
    assert isinstance(events[-1], MessageEnd)


# -- reply lines: the client's limits on the shared line reader


def test_reply_line_may_fill_the_limit_and_not_one_octet_more() -> None:
    text = b"a" * (MAX_REPLY_LINE - len(b"+OK \r\n"))
    conn = greeted()
    conn.noop()
    conn.receive_data(b"+OK " + text + b"\r\n")
    assert drain(conn) == [OkReply("NOOP", text.decode())]
    conn.noop()
    conn.receive_data(b"+OK " + text + b"a\r\n")
    with pytest.raises(LineTooLong, match=f"longer than {MAX_REPLY_LINE} octets"):
        conn.next_event()


def test_line_without_end_is_refused_once_it_reaches_the_limit() -> None:
    conn = ClientConnection(max_line=100)
    conn.receive_data(b"+OK " + b"a" * 95)
    assert conn.next_event() is NEED_DATA  # 99 octets: the CRLF may still come
    conn.receive_data(b"a")
    with pytest.raises(LineTooLong):
        conn.next_event()


def test_sasl_challenge_may_be_longer_than_a_reply_line() -> None:
    conn = greeted()
    conn.auth("XOAUTH2")
    error = base64.b64encode(b"x" * 9000)  # a JSON error document, say
    conn.receive_data(b"+ " + error + b"\r\n")
    assert drain(conn) == [Continuation(b"x" * 9000)]
    conn.sasl_response(b"")
    conn.receive_data(b"-ERR [AUTH] no\r\n")
    assert drain(conn) == [ErrReply("AUTH", "no", "AUTH")]
    # Once the exchange is over, a reply line is held to its own limit again.
    conn.noop()
    conn.receive_data(b"+OK " + b"a" * MAX_REPLY_LINE + b"\r\n")
    with pytest.raises(LineTooLong):
        conn.next_event()


def test_sasl_challenge_is_bounded_too() -> None:
    conn = greeted()
    conn.auth("XOAUTH2")
    conn.receive_data(b"+ " + b"QUFB" * (MAX_CHALLENGE_LINE // 4))
    with pytest.raises(LineTooLong, match=f"longer than {MAX_CHALLENGE_LINE} octets"):
        conn.next_event()


def test_challenge_that_is_not_base64_is_a_protocol_error() -> None:
    conn = greeted()
    conn.auth("PLAIN")
    conn.receive_data(b"+ not base64!\r\n")
    with pytest.raises(ProtocolError, match="not base64"):
        conn.next_event()


def test_bare_lf_reply_lines_are_read() -> None:
    conn = ClientConnection()
    conn.receive_data(b"+OK hello\n")
    assert drain(conn) == [Greeting("hello", None)]
    conn.capa()
    conn.receive_data(b"+OK\nUIDL\n.\n")
    assert drain(conn) == [Capabilities({"UIDL": ()})]


def test_closed_connection_is_reported_once() -> None:
    conn = greeted()
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]
    with pytest.raises(ProtocolError, match="already closed"):
        conn.next_event()


# -- bodies: one decoder reading straight from the receive buffer


def _stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def _bodies(events: list[Event]) -> list[bytes]:
    bodies, parts = [], []
    for event in events:
        if isinstance(event, MessageData):
            parts.append(event.data)
        elif isinstance(event, MessageEnd):
            bodies.append(b"".join(parts))
            parts = []
    assert not parts
    return bodies


# Body lines rich in what matters: dots at line starts, the terminator's look-alikes,
# bare CRs, and long dot-free lines (so both of the decoder's ways of finding dots run).
BODY_LINE = st.sampled_from(
    [b"", b".", b"..", b"...", b".x", b"x.", b".\r", b"\r", b"a.b.c", b"x" * 90, b"y" * 300]
) | st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))


@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(st.lists(BODY_LINE, max_size=25), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=10),
)
def test_pipelined_bodies_decode_the_same_wherever_the_reads_split(
    bodies: list[list[bytes]], cuts: list[int]
) -> None:
    wire = b"".join(b"+OK\r\n" + _stuffed(lines) + b".\r\n" for lines in bodies)
    wire += b"+OK done\r\n"
    conn = greeted()
    for number in range(1, len(bodies) + 1):
        conn.retr(number)
    conn.noop()
    events: list[Event] = []
    start = 0
    for point in [*sorted({cut % len(wire) for cut in cuts} - {0}), len(wire)]:
        conn.receive_data(wire[start:point])  # never b"": that would close
        start = point
        events += drain(conn)
    assert _bodies(events) == [b"".join(line + b"\r\n" for line in lines) for lines in bodies]
    ends = [event for event in events if isinstance(event, MessageEnd)]
    assert ends == [MessageEnd("RETR", number) for number in range(1, len(bodies) + 1)]
    # What followed the last terminator was read as the next reply, and nothing is left.
    assert events[-1] == OkReply("NOOP", "done")
    assert not conn.busy


def test_many_messages_in_one_read() -> None:
    lines = [b"From: a", b"", b".hidden", b"text. More text.", b".", b"end"]
    conn = greeted()
    for number in range(1, 201):
        conn.top(number, 3)
    conn.receive_data((b"+OK\r\n" + _stuffed(lines) + b".\r\n") * 200)
    events = drain(conn)
    assert _bodies(events) == [b"".join(line + b"\r\n" for line in lines)] * 200
    assert events[-1] == MessageEnd("TOP", 200)
    assert conn.pending == 0


def test_dot_dense_body_split_everywhere() -> None:
    # Enough dots that the decoder gives up visiting each one, with splits on both
    # sides of the point where it does.
    lines = [b"v1.2.3 a.b.c ... e.g. i.e.", b".", b"..", b"x" * 200] * 8
    wire = b"+OK\r\n" + _stuffed(lines) + b".\r\n+OK\r\n"
    expected = b"".join(line + b"\r\n" for line in lines)
    for split in range(1, len(wire), 7):
        conn = greeted()
        conn.retr(1)
        conn.noop()
        events: list[Event] = []
        for piece in (wire[:split], wire[split:]):
            conn.receive_data(piece)
            events += drain(conn)
        assert _bodies(events) == [expected], split
        assert events[-1] == OkReply("NOOP", "")
