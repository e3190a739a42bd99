"""Server core behaviour: CAPA per state, STLS attacks, pipelining, limits, fuzzing."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.proto.commands import Verb
from popbox.proto.events import (
    FLUSH,
    NEED_DATA,
    CloseConnection,
    ConnectionClosed,
    Flush,
    LoginRequest,
    SaslExchange,
    StartTls,
)
from popbox.proto.server import OUTPUT_HIGH_WATER, ServerSettings
from popbox.proto.state import TRANSITIONS, SessionState
from popbox.store.base import MessageInfo
from popbox.wireform import wire_size
from support.proto import Glue, connect

BASE_CAPABILITIES = [
    "TOP",
    "UIDL",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "PIPELINING",
    "EXPIRE NEVER",
    "IMPLEMENTATION popbox",
    "UTF8 USER",
    "LANG",
]


def capabilities(glue: Glue) -> list[str]:
    reply = glue.send(b"CAPA\r\n").decode()
    lines = reply.split("\r\n")
    assert lines[0] == "+OK Capability list follows"
    assert lines[-2:] == [".", ""]
    return lines[1:-2]


def test_capa_plain_connection_with_stls_and_plaintext_allowed() -> None:
    glue = Glue(connect(), messages=[b"x\n"])
    assert capabilities(glue) == [*BASE_CAPABILITIES, "STLS", "USER", "SASL PLAIN LOGIN"]


def test_capa_without_plaintext_offers_no_user_or_sasl() -> None:
    glue = Glue(connect(plaintext_auth_allowed=False))
    assert capabilities(glue) == [*BASE_CAPABILITIES, "STLS"]


def test_capa_after_stls_is_recomputed() -> None:
    glue = Glue(connect(plaintext_auth_allowed=False))
    glue.send(b"STLS\r\n")
    assert capabilities(glue) == [*BASE_CAPABILITIES, "USER", "SASL PLAIN LOGIN"]


def test_capa_on_implicit_tls() -> None:
    glue = Glue(connect(tls_active=True, stls_available=False, plaintext_auth_allowed=False))
    assert capabilities(glue) == [*BASE_CAPABILITIES, "USER", "SASL PLAIN LOGIN"]


def test_capa_in_transaction_omits_login_capabilities() -> None:
    settings = ServerSettings(expire="30", implementation="popbox-test")
    glue = Glue(connect(settings), messages=[b"x\n"])
    glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    assert capabilities(glue) == [
        "TOP",
        "UIDL",
        "RESP-CODES",
        "AUTH-RESP-CODE",
        "PIPELINING",
        "EXPIRE 30",
        "IMPLEMENTATION popbox-test",
        "UTF8 USER",
        "LANG",
    ]


def _expire_and_delay(glue: Glue) -> list[str]:
    return [c for c in capabilities(glue) if c.startswith(("EXPIRE", "LOGIN-DELAY"))]


def test_capa_announces_the_servers_login_delay_and_expire_in_both_states() -> None:
    settings = ServerSettings(expire="10", login_delay=60)
    glue = Glue(connect(settings), messages=[b"x\n"])
    assert _expire_and_delay(glue) == ["LOGIN-DELAY 60", "EXPIRE 10"]
    glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    assert _expire_and_delay(glue) == ["LOGIN-DELAY 60", "EXPIRE 10"]


def test_capa_tags_per_user_values_before_login_and_gives_the_users_own_after() -> None:
    """RFC 2449 sections 6.5 and 6.7: before authentication the largest LOGIN-DELAY
    and the smallest EXPIRE of any user, followed by USER; after it, the user's own
    values without the tag."""
    settings = ServerSettings(
        expire="5", expire_per_user=True, login_delay=900, login_delay_per_user=True
    )
    glue = Glue(
        connect(settings), messages=[b"x\n"], user_values={"expire": "30", "login_delay": 0}
    )
    assert _expire_and_delay(glue) == ["LOGIN-DELAY 900 USER", "EXPIRE 5 USER"]
    glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    assert _expire_and_delay(glue) == ["EXPIRE 30"]


def test_capa_after_login_keeps_the_servers_values_when_the_glue_gives_none() -> None:
    settings = ServerSettings(expire="NEVER", expire_per_user=True, login_delay_per_user=True)
    glue = Glue(connect(settings), messages=[b"x\n"])
    assert _expire_and_delay(glue) == ["LOGIN-DELAY 0 USER", "EXPIRE NEVER USER"]
    glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    assert _expire_and_delay(glue) == ["EXPIRE NEVER"]


@pytest.mark.parametrize(
    "values", [{"expire": "-1"}, {"expire": "never"}, {"expire": "5 USER"}, {"login_delay": -1}]
)
def test_user_values_that_cannot_go_on_the_wire_are_refused(values: dict[str, object]) -> None:
    glue = Glue(connect(), messages=[b"x\n"], user_values=values)
    with pytest.raises(ValueError, match=r"expire|login_delay"):
        glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")


@pytest.mark.parametrize(
    "options", [{"expire": "5 USER"}, {"expire": "x"}, {"login_delay": -1}]
)
def test_settings_that_cannot_go_on_the_wire_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"expire|login_delay"):
        ServerSettings(**options)  # type: ignore[arg-type]


def test_state_table_rules() -> None:
    # The documented shape: nothing is accepted in UPDATE or CLOSED, QUIT leaves
    # TRANSACTION through UPDATE, and every login command leads to TRANSACTION.
    states = {state for state, _ in TRANSITIONS}
    assert states == {SessionState.AUTHORIZATION, SessionState.TRANSACTION}
    assert TRANSITIONS[SessionState.TRANSACTION, Verb("QUIT")] is SessionState.UPDATE
    for verb in ("PASS", "APOP", "AUTH"):
        assert TRANSITIONS[SessionState.AUTHORIZATION, Verb(verb)] is SessionState.TRANSACTION


# -- STLS (RFC 2595) and the attacks on it ------------------------------------------


def test_stls_plaintext_injection_is_discarded() -> None:
    """CVE-2011-0411: commands pipelined after STLS in plaintext must not run."""
    conn = connect(plaintext_auth_allowed=False)
    conn.receive_data(b"STLS\r\nUSER evil\r\nPASS evil\r\nCAPA\r\n")
    assert isinstance(conn.next_event(), StartTls)
    assert conn.data_to_send() == b"+OK Begin TLS negotiation now.\r\n"
    with pytest.raises(RuntimeError):
        conn.next_event()  # the glue must finish the handshake first
    conn.tls_established()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""
    conn.receive_data(b"PASS evil\r\n")
    conn.next_event()
    assert conn.data_to_send() == b"-ERR No user name given (send USER first).\r\n"


def test_partial_line_before_stls_handshake_is_discarded() -> None:
    conn = connect()
    conn.receive_data(b"STLS\r\nUSER ev")
    assert isinstance(conn.next_event(), StartTls)
    conn.tls_established()
    conn.receive_data(b"il\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().endswith(b"-ERR Unknown command\r\n")


def test_stls_twice_is_refused() -> None:
    glue = Glue(connect())
    assert glue.send(b"STLS\r\n") == b"+OK Begin TLS negotiation now.\r\n"
    assert glue.send(b"STLS\r\n") == b"-ERR TLS is already active.\r\n"


def test_stls_on_implicit_tls_is_refused() -> None:
    glue = Glue(connect(tls_active=True, stls_available=False))
    assert glue.send(b"STLS\r\n") == b"-ERR TLS is already active.\r\n"


def test_stls_without_certificate_is_refused() -> None:
    glue = Glue(connect(stls_available=False))
    assert glue.send(b"STLS\r\n") == b"-ERR TLS is not available.\r\n"


def test_stls_after_login_is_refused() -> None:
    glue = Glue(connect(), messages=[])
    glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    assert glue.send(b"STLS\r\n") == b"-ERR STLS is not allowed now.\r\n"


def test_user_name_given_before_stls_is_forgotten() -> None:
    glue = Glue(connect())
    glue.send(b"USER mrose\r\n")
    glue.send(b"STLS\r\n")
    assert glue.send(b"PASS tanstaaf\r\n") == b"-ERR No user name given (send USER first).\r\n"


# -- pipelining (RFC 2449 section 6.6) ----------------------------------------------


def test_dozens_of_pipelined_retrs_come_back_in_order() -> None:
    messages = [f"Subject: {i}\n\nbody {i}\n".encode() for i in range(40)]
    glue = Glue(connect(), messages=messages)
    commands = b"USER mrose\r\nPASS tanstaaf\r\n" + b"".join(
        b"RETR %d\r\nNOOP\r\n" % (i + 1) for i in range(40)
    )
    reply = glue.send(commands + b"QUIT\r\n")
    expected = b"+OK\r\n+OK Logged in, 40 messages (%d octets).\r\n" % sum(
        wire_size(m) for m in messages
    )
    for message in messages:
        expected += b"+OK %d octets\r\n" % wire_size(message)
        expected += message.replace(b"\n", b"\r\n") + b".\r\n+OK\r\n"
    assert reply == expected + b"+OK Logging out, 40 messages left.\r\n"


def test_next_event_is_lazy() -> None:
    conn = connect()
    conn.receive_data(b"USER a\r\nPASS b\r\nCAPA\r\n")
    assert isinstance(conn.next_event(), LoginRequest)
    # CAPA must not have been answered before the login's reply.
    assert conn.data_to_send() == b"+OK\r\n"
    conn.login_succeeded([MessageInfo("u", 3)])
    assert conn.next_event() is NEED_DATA
    out = conn.data_to_send()
    assert out.startswith(b"+OK Logged in, 1 messages (3 octets).\r\n+OK Capability")


def test_flush_bounds_output_from_one_receive() -> None:
    conn = connect()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    conn.next_event()
    conn.login_succeeded([MessageInfo(f"uid{i}", 100) for i in range(1000)])
    conn.data_to_send()
    conn.receive_data(b"UIDL\r\n" * 200)  # about 2.6 MB of replies if answered at once
    event = conn.next_event()
    assert event is FLUSH
    assert isinstance(event, Flush)
    first = conn.data_to_send()
    assert OUTPUT_HIGH_WATER <= len(first) < OUTPUT_HIGH_WATER + 20_000
    total = len(first)
    while (event := conn.next_event()) is FLUSH:
        total += len(conn.data_to_send())
    assert event is NEED_DATA
    total += len(conn.data_to_send())
    assert total == 200 * len(b"+OK 1000 messages (100000 octets)\r\n.\r\n") + 200 * sum(
        len(f"{i + 1} uid{i}\r\n") for i in range(1000)
    )


# -- limits --------------------------------------------------------------------------


def test_bad_commands_budget_closes_the_connection() -> None:
    glue = Glue(connect(ServerSettings(max_bad_commands=3)))
    assert glue.send(b"\r\n") == b"-ERR Empty command\r\n"
    assert glue.send(b"FOO\r\n") == b"-ERR Unknown command\r\n"
    assert not glue.closed
    assert glue.send(b"STAT\r\n") == b"-ERR Too many bad commands.\r\n"
    assert glue.closed
    assert isinstance(glue.events[-1], CloseConnection)
    assert glue.conn.state is SessionState.CLOSED
    assert isinstance(glue.conn.next_event(), ConnectionClosed)


def test_over_long_command_line_is_refused_and_counted() -> None:
    conn = connect(ServerSettings(max_bad_commands=3))
    conn.receive_data(b"USER " + b"a" * 3000 + b"\r\nNOOP\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"-ERR Line too long.\r\n-ERR NOOP is not allowed now.\r\n"
    conn.receive_data(b"X" * (1 << 20))
    assert isinstance(conn.next_event(), CloseConnection)
    assert conn.data_to_send() == b"-ERR Too many bad commands.\r\n"


def test_one_mib_line_through_the_connection_stays_bounded() -> None:
    conn = connect()
    chunk = b"A" * 65536
    tracemalloc.start()
    try:
        for _ in range(16):
            conn.receive_data(chunk)
            assert conn.next_event() is NEED_DATA
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One received chunk in flight plus the line limit, not the megabyte.
    assert peak < 3 * len(chunk)
    conn.receive_data(b"\r\nCAPA\r\n")
    conn.next_event()
    assert conn.data_to_send().startswith(b"-ERR Line too long.\r\n+OK Capability")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="expire"):
        ServerSettings(expire="soon")
    with pytest.raises(ValueError, match="line limits"):
        ServerSettings(max_command_line=10)
    with pytest.raises(ValueError, match="hostname"):
        ServerSettings(hostname="a b")


def test_glue_misuse_raises() -> None:
    conn = connect()
    with pytest.raises(RuntimeError):
        conn.login_succeeded([])
    with pytest.raises(RuntimeError):
        conn.tls_established()


# -- fuzzing -------------------------------------------------------------------------

LINES = st.sampled_from(
    [
        b"CAPA",
        b"STAT",
        b"LIST",
        b"LIST 1",
        b"LIST 9",
        b"UIDL",
        b"UIDL 2",
        b"RETR 1",
        b"TOP 2 1",
        b"DELE 1",
        b"DELE 2",
        b"RSET",
        b"NOOP",
        b"USER mrose",
        b"PASS tanstaaf",
        b"PASS nope",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"*",
        b"AUTH",
        b"STLS",
        b"",
        b"RETR -1",
        b"APOP mrose 0123456789abcdef0123456789abcdef",
        b"\xff\xfe",
        b"AUTH PLAIN AG1yb3NlAHRhbnN0YWFm",
    ]
) | st.binary(max_size=30)


@settings(max_examples=200)
@given(st.lists(LINES, max_size=40), st.integers(min_value=1, max_value=50))
def test_any_input_never_raises(lines: list[bytes], chunk: int) -> None:
    messages = [b"Subject: a\n\n.body\n", b"b\r\n"]
    glue = Glue(connect(ServerSettings(max_bad_commands=1000)), messages=messages)
    data = b"".join(line + b"\r\n" for line in lines)
    out = b""
    for start in range(0, len(data), chunk):
        out += glue.send(data[start : start + chunk])
        if glue.closed:
            break
    # Every reply is a status line, a SASL challenge, or part of a multi-line reply.
    assert not data.strip() or out.startswith((b"+OK", b"-ERR", b"+ "))
    assert out.endswith(b"\r\n") or not out


# A model of RFC 1939's TRANSACTION state: numbers fixed, DELE marks, RSET unmarks.
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["DELE", "RSET", "STAT", "LIST", "UIDL", "RETR", "TOP"]),
        st.integers(min_value=-1, max_value=6),
    ),
    max_size=30,
)


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=30), max_size=5), OPERATIONS)
def test_transaction_matches_the_rfc1939_model(
    messages: list[bytes], operations: list[tuple[str, int]]
) -> None:
    glue = Glue(connect(ServerSettings(max_bad_commands=1000)), messages=messages)
    glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    sizes = [wire_size(m) for m in messages]
    deleted: set[int] = set()

    def lookup(number: int) -> bytes | None:
        if not 1 <= number <= len(messages):
            return b"-ERR No such message.\r\n"
        if number - 1 in deleted:
            return b"-ERR Message %d already deleted.\r\n" % number
        return None

    for verb, number in operations:
        if verb in ("RSET", "STAT"):
            reply = glue.send(verb.encode() + b"\r\n")
            if verb == "RSET":
                deleted.clear()
            live = [i for i in range(len(messages)) if i not in deleted]
            count, octets = len(live), sum(sizes[i] for i in live)
            if verb == "STAT":
                assert reply == b"+OK %d %d\r\n" % (count, octets)
            continue
        argument = b"%d" % number + (b" 0" if verb == "TOP" else b"")
        reply = glue.send(verb.encode() + b" " + argument + b"\r\n")
        if number < 0:
            assert reply == b"-ERR Invalid message number\r\n"
            continue
        error = lookup(number)
        if error is not None:
            assert reply == error
        elif verb == "DELE":
            assert reply == b"+OK Message %d deleted.\r\n" % number
            deleted.add(number - 1)
        elif verb == "LIST":
            assert reply == b"+OK %d %d\r\n" % (number, sizes[number - 1])
        elif verb == "UIDL":
            assert reply == b"+OK %d uid%d\r\n" % (number, number - 1)
        else:
            assert reply.startswith(b"+OK")
            assert reply.endswith(b".\r\n")
    glue.send(b"QUIT\r\n")
    assert glue.committed == frozenset(deleted)


@settings(max_examples=200)
@given(
    st.lists(LINES, max_size=25), st.lists(st.integers(min_value=0, max_value=2000), max_size=10)
)
def test_replies_do_not_depend_on_how_input_is_split(lines: list[bytes], cuts: list[int]) -> None:
    messages = [b"Subject: a\n\n.body\n", b"b\r\n"]
    data = b"".join(line + b"\r\n" for line in lines)

    def run(pieces: list[bytes]) -> bytes:
        # Without STLS: it rightly discards whatever was pipelined after it.
        conn = connect(ServerSettings(max_bad_commands=1000), stls_available=False)
        glue = Glue(conn, messages=messages)
        return b"".join(glue.send(piece) for piece in pieces if piece and not glue.closed)

    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert run(pieces) == run([data])


def test_listings_are_one_block_and_follow_deletions() -> None:
    conn = connect()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), LoginRequest)
    conn.login_succeeded([MessageInfo(f"u{i}", 100 + i) for i in range(5)])
    conn.data_to_send()
    conn.receive_data(b"DELE 2\r\nDELE 4\r\nLIST\r\nUIDL\r\nSTAT\r\nRSET\r\nSTAT\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().split(b"\r\n")[2:] == [
        b"+OK 3 messages (306 octets)",
        b"1 100",
        b"3 102",
        b"5 104",
        b".",
        b"+OK 3 messages (306 octets)",
        b"1 u0",
        b"3 u2",
        b"5 u4",
        b".",
        b"+OK 3 306",
        b"+OK Maildrop has 5 messages (510 octets).",
        b"+OK 5 510",
        b"",
    ]


def test_a_uidl_that_is_not_a_wire_token_is_still_sent_as_one_line() -> None:
    # The store promises clean UIDLs; if one ever is not, the listing must not let
    # it end a line early and forge a reply.
    conn = connect()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), LoginRequest)
    conn.login_succeeded([MessageInfo("ok", 1), MessageInfo("x\r\n+OK forged", 1)])
    conn.data_to_send()
    conn.receive_data(b"UIDL\r\nUIDL 2\r\n")
    assert conn.next_event() is NEED_DATA
    lines = conn.data_to_send().split(b"\r\n")
    assert lines[1:4] == [b"1 ok", b"2 x  +OK forged", b"."]
    assert lines[4] == b"+OK 2 x  +OK forged"


def test_command_cache_never_keeps_credentials() -> None:
    from popbox.proto import commands

    conn = connect()
    conn.receive_data(b"USER someone\r\nPASS hunter2\r\n")
    assert isinstance(conn.next_event(), LoginRequest)
    assert not any(b"hunter2" in line or b"someone" in line for line in commands._parsed)


class Columns(list[MessageInfo]):
    """A snapshot that offers its columns, as the Maildir store's MessageTable does."""

    def __init__(self, uidls: list[str], sizes: list[int], *, checked: bool) -> None:
        super().__init__(MessageInfo(u, s) for u, s in zip(uidls, sizes, strict=True))
        self.uidls = uidls
        self.sizes = sizes
        self.uidls_checked = checked
        self.rendered: dict[str, bytes] = {}


def session_output(messages: list[MessageInfo], commands: bytes) -> bytes:
    conn = connect()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), LoginRequest)
    conn.login_succeeded(messages)
    conn.receive_data(commands)
    assert conn.next_event() is NEED_DATA
    return conn.data_to_send()


def test_a_snapshot_given_as_columns_lists_exactly_as_one_given_per_message() -> None:
    uidls = [f"6b07cf9c{i:08x}" for i in range(1, 301)]
    sizes = [1000 + i for i in range(300)]
    commands = b"STAT\r\nLIST\r\nUIDL\r\nLIST 7\r\nUIDL 300\r\nDELE 2\r\nLIST\r\nUIDL\r\n"
    plain = session_output([MessageInfo(u, s) for u, s in zip(uidls, sizes, strict=True)], commands)
    shared = Columns(uidls, sizes, checked=True)
    assert session_output(shared, commands) == plain
    # The next session of the same snapshot lists every message again: the marks of
    # the one before do not leak through the listings kept with the columns.
    assert session_output(shared, commands) == plain
    full = session_output(shared, b"UIDL\r\n").split(b"\r\n")
    assert full[3:5] == [b"1 6b07cf9c00000001", b"2 6b07cf9c00000002"]
    assert len(full) == 3 + 300 + 2  # USER, login and listing replies; ".", ""


def test_columns_whose_uidls_are_not_vouched_for_are_still_cleaned() -> None:
    unchecked = Columns(["ok", "x\r\n+OK forged"], [1, 1], checked=False)
    lines = session_output(unchecked, b"UIDL\r\n").split(b"\r\n")
    assert lines[3:6] == [b"1 ok", b"2 x  +OK forged", b"."]


class Templated(list[str]):
    """UIDLs that also say how they are made, as the Maildir store's UidlColumn does."""

    def __init__(self, template: str, arguments: list[int]) -> None:
        super().__init__(template % argument for argument in arguments)
        self.template = template
        self.arguments = arguments


@settings(max_examples=100)
@given(
    st.lists(st.integers(min_value=1, max_value=2**40), unique=True, max_size=30).map(sorted),
    st.sets(st.integers(min_value=1, max_value=32)),
    st.sampled_from(["6b07cf9c%08x", "%08x", "u%x"]),
)
def test_uidls_given_by_their_template_list_exactly_as_the_strings(
    uids: list[int], deleted: set[int], template: str
) -> None:
    """The listing rendered from the template (one %-format from the UIDs) is the one
    rendered from the strings, before DELE, after it and in the next session."""
    sizes = [100 + uid % 7 for uid in uids]
    commands = b"UIDL\r\nLIST\r\n"
    commands += b"".join(b"DELE %d\r\n" % number for number in sorted(deleted))
    commands += b"UIDL\r\nLIST\r\nUIDL 1\r\n"
    infos = [MessageInfo(template % uid, size) for uid, size in zip(uids, sizes, strict=True)]
    plain = session_output(infos, commands)
    shared = Columns(Templated(template, uids), sizes, checked=True)
    assert session_output(shared, commands) == plain
    assert session_output(shared, commands) == plain


# -- SASL mechanisms the glue runs ---------------------------------------------------

GLUE_MECHANISMS = ServerSettings(mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "XOAUTH2"))


def test_capa_lists_each_mechanism_where_it_may_run() -> None:
    plain = Glue(connect(GLUE_MECHANISMS, plaintext_auth_allowed=False))
    assert capabilities(plain)[-1] == "SASL SCRAM-SHA-256"
    assert plain.send(b"AUTH\r\n") == b"+OK Available mechanisms\r\nSCRAM-SHA-256\r\n.\r\n"
    plain.send(b"STLS\r\n")
    assert capabilities(plain)[-1] == "SASL SCRAM-SHA-256-PLUS SCRAM-SHA-256 XOAUTH2"


def test_a_channel_bound_mechanism_is_refused_without_tls() -> None:
    glue = Glue(connect(GLUE_MECHANISMS))
    reply = glue.send(b"AUTH SCRAM-SHA-256-PLUS\r\n")
    assert reply == b"-ERR [AUTH] Channel binding needs TLS.\r\n"
    strict = Glue(connect(GLUE_MECHANISMS, plaintext_auth_allowed=False))
    reply = strict.send(b"AUTH XOAUTH2 dA==\r\n")
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")


def test_an_exchange_the_glue_runs_goes_step_by_step_to_a_login() -> None:
    glue = Glue(connect(GLUE_MECHANISMS), messages=[b"x\n"])
    assert glue.send(b"AUTH SCRAM-SHA-256\r\n") == b"+ V2hvIGFyZSB5b3U/\r\n"
    assert glue.events[-2] == SaslExchange("SCRAM-SHA-256", None, first=True)
    reply = glue.send(b"bXJvc2UgdGFuc3RhYWY=\r\n")  # "mrose tanstaaf"
    assert reply.startswith(b"+OK Logged in, 1 messages")
    assert SaslExchange("SCRAM-SHA-256", b"mrose tanstaaf", first=False) in glue.events
    assert glue.conn.state is SessionState.TRANSACTION


def test_an_exchange_the_glue_runs_with_an_initial_response() -> None:
    glue = Glue(connect(GLUE_MECHANISMS))
    reply = glue.send(b"AUTH SCRAM-SHA-256 bXJvc2UgdGFuc3RhYWY=\r\n")
    assert reply.startswith(b"+OK Logged in")
    assert SaslExchange("SCRAM-SHA-256", b"mrose tanstaaf", first=True) in glue.events


def test_a_failed_or_cancelled_exchange_counts_as_the_core_counts_its_own() -> None:
    glue = Glue(connect(GLUE_MECHANISMS))
    assert glue.send(b"AUTH SCRAM-SHA-256\r\n*\r\n").endswith(b"-ERR Authentication cancelled.\r\n")
    assert glue.conn.state is SessionState.AUTHORIZATION
    for _ in range(2):
        reply = glue.send(b"AUTH SCRAM-SHA-256 bXJvc2Ugd3Jvbmc=\r\n")  # "mrose wrong"
        assert reply == b"-ERR [AUTH] Authentication failed.\r\n"
    reply = glue.send(b"AUTH SCRAM-SHA-256\r\n!!!\r\n")
    assert reply.endswith(b"-ERR [AUTH] Invalid base64 data.\r\n")
    assert glue.closed  # the third failure ends the session, as for PLAIN


def test_a_glue_run_response_is_bounded_like_any_sasl_line() -> None:
    glue = Glue(connect(GLUE_MECHANISMS))
    glue.send(b"AUTH SCRAM-SHA-256\r\n")
    reply = glue.send(b"A" * (ServerSettings().max_sasl_line + 10) + b"\r\n")
    assert reply == b"-ERR [AUTH] SASL response too long.\r\n"
    assert glue.send(b"NOOP\r\n") == b"-ERR NOOP is not allowed now.\r\n"


def test_mechanism_names_are_checked() -> None:
    with pytest.raises(ValueError, match="SASL mechanism name"):
        ServerSettings(mechanisms=("scram-sha-256",))
    with pytest.raises(ValueError, match="twice"):
        ServerSettings(mechanisms=("PLAIN", "PLAIN"))


# -- UTF-8 and languages (RFC 6856) ---------------------------------------------------


def test_utf8_is_accepted_before_login_only() -> None:
    glue = Glue(connect(), users={"jos\u00e9": "s\u00e9same"}, messages=[b"x\n"])
    assert glue.send(b"UTF8\r\n") == b"+OK UTF8 enabled.\r\n"
    assert glue.conn.utf8
    glue.send("USER jos\u00e9\r\nPASS s\u00e9same\r\n".encode())
    assert glue.conn.state is SessionState.TRANSACTION
    assert glue.send(b"UTF8\r\n") == b"-ERR UTF8 is not allowed now.\r\n"


def test_user_names_are_compared_in_nfc() -> None:
    # "jose" + COMBINING ACUTE ACCENT is the same name as the precomposed one.
    glue = Glue(connect(), users={"jos\u00e9": "pw"}, messages=[b"x\n"])
    reply = glue.send("USER jose\u0301\r\nPASS pw\r\n".encode())
    assert reply.endswith(b"+OK Logged in, 1 messages (3 octets).\r\n")


def test_lang_lists_and_selects_languages_in_both_states() -> None:
    glue = Glue(connect(), messages=[b"x\n"])
    assert glue.send(b"LANG\r\n") == b"+OK Language listing follows\r\nen English\r\n.\r\n"
    assert glue.send(b"LANG en-GB\r\n") == b"+OK en Language is now English.\r\n"
    assert glue.send(b"LANG *\r\n") == b"+OK en Language is now English.\r\n"
    assert glue.send(b"LANG fr\r\n") == b"-ERR Language not supported.\r\n"
    assert glue.send(b"LANG en_US\r\n") == b"-ERR LANG takes one language range\r\n"
    glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    assert glue.send(b"LANG i-default\r\n") == b"+OK en Language is now English.\r\n"
