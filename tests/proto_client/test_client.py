"""Transcripts and fuzzing of the sans-I/O POP3 client (popbox.proto.client)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.errors import CollectorError, RemoteServerError
from popbox.proto.client import (
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
    OkReply,
    ScanListing,
    StatReply,
    UidListing,
    apop_digest,
    oauthbearer_response,
    plain_response,
    valid_uidl,
    xoauth2_response,
)


def drain(conn: ClientConnection) -> list[Event]:
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert not isinstance(event, type(NEED_DATA))
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


def test_apop_digest_matches_rfc1939_example() -> None:
    assert (
        apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
        == "c4c9334bac560ecc979e58001b3e22fb"
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
    with pytest.raises(RemoteServerError):
        conn.next_event()


def test_listing_bounded_by_max_entries() -> None:
    conn = ClientConnection(max_entries=3)
    conn.receive_data(b"+OK\r\n")
    drain(conn)
    conn.uidl_all()
    conn.receive_data(b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n4 d\r\n.\r\n")
    with pytest.raises(RemoteServerError):
        drain(conn)


def test_huge_size_is_refused() -> None:
    conn = greeted()
    conn.list_all()
    conn.receive_data(b"+OK\r\n1 99999999999\r\n.\r\n")
    with pytest.raises(RemoteServerError):
        drain(conn)


def test_unsolicited_reply_is_a_protocol_violation() -> None:
    conn = greeted()
    conn.receive_data(b"+OK surprise\r\n")
    with pytest.raises(RemoteServerError):
        drain(conn)


def test_data_injected_after_stls_ok_is_refused() -> None:
    conn = greeted()
    conn.stls()
    conn.receive_data(b"+OK begin TLS\r\n+OK injected\r\n")
    assert isinstance(conn.next_event(), OkReply)
    with pytest.raises(RemoteServerError):
        conn.start_tls()


def test_command_injection_through_username_is_refused() -> None:
    conn = greeted()
    with pytest.raises(CollectorError):
        conn.user("bob\r\nDELE 1")


def test_closed_mid_message_is_an_error() -> None:
    conn = greeted()
    conn.retr(1)
    conn.receive_data(b"+OK\r\npartial")
    drain(conn)
    conn.receive_data(b"")
    with pytest.raises(RemoteServerError):
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


def test_oauthbearer_gs2_header() -> None:
    assert oauthbearer_response("a,b=c", "TOK") == b"n,a=a=2Cb=3Dc,\x01auth=Bearer TOK\x01\x01"
    assert (
        oauthbearer_response("u", "T", "mail.example", 995)
        == b"n,a=u,\x01host=mail.example\x01port=995\x01auth=Bearer T\x01\x01"
    )


_COMMANDS = st.lists(
    st.sampled_from(["capa", "uidl", "list", "stat", "retr", "top", "noop", "auth"]),
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(commands=_COMMANDS, chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_server_bytes_raise_only_remote_server_error(
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
    except RemoteServerError:
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
