"""Transcript tests of the server core: the RFC examples and every error path."""

from __future__ import annotations

import base64

import pytest

from popbox.proto.events import (
    NEED_DATA,
    CloseConnection,
    ConnectionClosed,
    LoginRequest,
    Quit,
    Retrieve,
)
from popbox.proto.sasl import apop_digest
from popbox.proto.server import PLAINTEXT_DISALLOWED, ServerSettings
from popbox.proto.state import SessionState
from support.proto import Glue, connect

MESSAGES = [b"Subject: one\n\nfirst body\n" + b"x" * 100 + b"\n", b"Subject: two\n\n.dot\n"]


def login(glue: Glue) -> bytes:
    return glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")


def test_rfc1939_example_session() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    sizes = [len(m) + m.count(b"\n") for m in MESSAGES]
    assert glue.conn.greeting() == b"+OK popbox ready.\r\n"
    assert login(glue) == b"+OK\r\n+OK Logged in, 2 messages (%d octets).\r\n" % sum(sizes)
    assert glue.conn.state is SessionState.TRANSACTION
    assert glue.send(b"STAT\r\n") == b"+OK 2 %d\r\n" % sum(sizes)
    assert glue.send(b"LIST\r\n") == (
        b"+OK 2 messages (%d octets)\r\n1 %d\r\n2 %d\r\n.\r\n" % (sum(sizes), *sizes)
    )
    assert glue.send(b"RETR 1\r\n") == (
        b"+OK %d octets\r\n" % sizes[0] + MESSAGES[0].replace(b"\n", b"\r\n") + b".\r\n"
    )
    assert glue.send(b"DELE 1\r\n") == b"+OK Message 1 deleted.\r\n"
    assert glue.send(b"RETR 2\r\n") == (
        b"+OK %d octets\r\nSubject: two\r\n\r\n..dot\r\n.\r\n" % sizes[1]
    )
    assert glue.send(b"DELE 2\r\n") == b"+OK Message 2 deleted.\r\n"
    assert glue.send(b"QUIT\r\n") == b"+OK Logging out, 0 messages left.\r\n"
    assert glue.committed == frozenset({0, 1})
    assert glue.conn.state is SessionState.CLOSED


def test_commands_are_case_insensitive() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    assert glue.send(b"user mrose\r\npAsS tanstaaf\r\n").endswith(b"octets).\r\n")
    assert glue.send(b"stat\r\n").startswith(b"+OK 2 ")
    assert glue.send(b"Uidl 2\r\n") == b"+OK 2 uid1\r\n"


def test_bare_lf_commands_are_accepted() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    assert glue.send(b"USER mrose\nPASS tanstaaf\nNOOP\n").endswith(b"+OK\r\n")


def test_quit_in_authorization_closes_without_a_quit_event() -> None:
    conn = connect()
    conn.receive_data(b"QUIT\r\n")
    event = conn.next_event()
    assert isinstance(event, CloseConnection)
    assert conn.data_to_send() == b"+OK popbox signing off.\r\n"
    assert conn.state is SessionState.CLOSED
    assert isinstance(conn.next_event(), ConnectionClosed)


def test_quit_commit_failure_answers_sys_temp() -> None:
    glue = Glue(connect(), messages=list(MESSAGES), commit_fails=True)
    login(glue)
    glue.send(b"DELE 1\r\n")
    assert glue.send(b"QUIT\r\n") == b"-ERR [SYS/TEMP] Some deleted messages not removed.\r\n"


def test_quit_event_carries_snapshot_indexes_of_deleted_messages() -> None:
    conn = connect()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), LoginRequest)
    conn.login_succeeded(Glue(conn, messages=list(MESSAGES) * 2).infos())
    conn.receive_data(b"DELE 2\r\nDELE 4\r\nQUIT\r\n")
    event = conn.next_event()
    assert event == Quit(frozenset({1, 3}))
    assert conn.state is SessionState.UPDATE


def test_peer_close_processes_buffered_commands_first() -> None:
    conn = connect()
    conn.receive_data(b"CAPA\r\nNOO")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.data_to_send().startswith(b"+OK Capability list follows\r\n")


# -- message numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "reply"),
    [
        (b"0", b"-ERR No such message.\r\n"),
        (b"3", b"-ERR No such message.\r\n"),
        (b"99999999999999999999999999999", b"-ERR No such message.\r\n"),
        (b"9" * 2000, b"-ERR No such message.\r\n"),
        (b"-1", b"-ERR Invalid message number\r\n"),
        (b"+1", b"-ERR Invalid message number\r\n"),
        ("\u0661".encode(), b"-ERR Invalid message number\r\n"),
        ("\uff11".encode(), b"-ERR Invalid message number\r\n"),
        (b"1.0", b"-ERR Invalid message number\r\n"),
        (b"0x1", b"-ERR Invalid message number\r\n"),
        (b"1 2", b"-ERR RETR takes one message number\r\n"),
    ],
)
def test_bad_message_numbers(argument: bytes, reply: bytes) -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    login(glue)
    assert glue.send(b"RETR " + argument + b"\r\n") == reply
    assert glue.conn.state is SessionState.TRANSACTION


def test_leading_zeros_name_the_same_message() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    login(glue)
    assert glue.send(b"UIDL 002\r\n") == b"+OK 2 uid1\r\n"


def test_deleted_messages_are_refused_and_skipped() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    login(glue)
    size2 = len(MESSAGES[1]) + MESSAGES[1].count(b"\n")
    assert glue.send(b"DELE 1\r\n") == b"+OK Message 1 deleted.\r\n"
    for command in (b"LIST 1", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"DELE 1"):
        assert glue.send(command + b"\r\n") == b"-ERR Message 1 already deleted.\r\n"
    assert glue.send(b"STAT\r\n") == b"+OK 1 %d\r\n" % size2
    assert glue.send(b"LIST\r\n") == b"+OK 1 messages (%d octets)\r\n2 %d\r\n.\r\n" % (size2, size2)
    assert glue.send(b"UIDL\r\n") == b"+OK 1 messages (%d octets)\r\n2 uid1\r\n.\r\n" % size2
    # Numbers never shift: message 2 is still message 2.
    assert glue.send(b"UIDL 2\r\n") == b"+OK 2 uid1\r\n"
    assert glue.send(b"RSET\r\n").startswith(b"+OK Maildrop has 2 messages")
    assert glue.send(b"UIDL 1\r\n") == b"+OK 1 uid0\r\n"
    glue.send(b"QUIT\r\n")
    assert glue.committed == frozenset()


def test_top_sends_headers_blank_line_and_n_body_lines() -> None:
    glue = Glue(connect(), messages=[b"A: 1\nB: 2\n\nl1\nl2\nl3\n"])
    login(glue)
    assert glue.send(b"TOP 1 0\r\n") == b"+OK Top of message follows.\r\nA: 1\r\nB: 2\r\n\r\n.\r\n"
    assert glue.send(b"TOP 1 2\r\n").endswith(b"\r\n\r\nl1\r\nl2\r\n.\r\n")
    assert glue.send(b"TOP 1 99999999999999999999999\r\n").endswith(b"l3\r\n.\r\n")
    assert glue.send(b"TOP 1\r\n") == b"-ERR TOP takes a message number and a line count\r\n"
    assert glue.send(b"TOP 1 -1\r\n") == b"-ERR Invalid line count\r\n"
    retrieves = [event for event in glue.events if isinstance(event, Retrieve)]
    assert [event.body_lines for event in retrieves] == [0, 2, 10**12]
    assert {(event.index, event.number) for event in retrieves} == {(0, 1)}


def test_unavailable_message_answers_sys_temp() -> None:
    glue = Glue(connect(), messages=list(MESSAGES), unavailable={1})
    login(glue)
    assert glue.send(b"RETR 2\r\n") == (
        b"-ERR [SYS/TEMP] Message 2 is unavailable, try again later.\r\n"
    )


def test_transaction_commands_before_login_are_refused() -> None:
    conn = connect()
    for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"UIDL", b"TOP 1 1"):
        conn.receive_data(command + b"\r\n")
        assert conn.next_event() is NEED_DATA
        verb = command.split()[0].decode()
        assert conn.data_to_send() == f"-ERR {verb} is not allowed now.\r\n".encode()


def test_login_commands_after_login_are_refused() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    login(glue)
    for command in (b"USER x", b"PASS y", b"AUTH PLAIN", b"STLS", b"APOP a " + b"0" * 32):
        verb = command.split()[0].decode()
        assert glue.send(command + b"\r\n") == f"-ERR {verb} is not allowed now.\r\n".encode()


# -- USER / PASS / APOP -------------------------------------------------------------


def test_pass_without_user_is_refused() -> None:
    glue = Glue(connect())
    assert glue.send(b"PASS tanstaaf\r\n") == b"-ERR No user name given (send USER first).\r\n"


def test_user_twice_replaces_the_name() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    glue.send(b"USER nobody\r\nUSER mrose\r\n")
    assert glue.send(b"PASS tanstaaf\r\n").startswith(b"+OK Logged in")


def test_password_keeps_its_spaces() -> None:
    glue = Glue(connect(), users={"mrose": "two words "}, messages=[])
    assert glue.send(b"USER mrose\r\nPASS two words \r\n").endswith(
        b"+OK Logged in, 0 messages (0 octets).\r\n"
    )


def test_failed_pass_needs_user_again() -> None:
    glue = Glue(connect())
    assert (
        glue.send(b"USER mrose\r\nPASS wrong\r\n")
        == b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
    )
    assert glue.send(b"PASS tanstaaf\r\n") == b"-ERR No user name given (send USER first).\r\n"


def test_in_use_maildrop() -> None:
    glue = Glue(connect(), in_use=True)
    assert glue.send(b"USER mrose\r\nPASS tanstaaf\r\n").endswith(
        b"-ERR [IN-USE] Maildrop is locked by another session.\r\n"
    )
    assert glue.conn.state is SessionState.AUTHORIZATION


def test_too_many_auth_failures_close_the_connection() -> None:
    glue = Glue(connect(ServerSettings(max_auth_failures=3)))
    for _ in range(2):
        assert glue.send(b"USER mrose\r\nPASS wrong\r\n").endswith(
            b"-ERR [AUTH] Authentication failed.\r\n"
        )
        assert not glue.closed
    assert glue.send(b"USER mrose\r\nPASS wrong\r\n").endswith(
        b"-ERR [AUTH] Authentication failed.\r\n"
    )
    assert glue.closed
    assert isinstance(glue.events[-1], CloseConnection)


def test_in_use_does_not_count_as_an_auth_failure() -> None:
    glue = Glue(connect(ServerSettings(max_auth_failures=1)), in_use=True)
    for _ in range(3):
        glue.send(b"USER mrose\r\nPASS tanstaaf\r\n")
    assert not glue.closed


@pytest.mark.parametrize("code", ["LOGIN-DELAY", "SYS/PERM", "SYS/TEMP"])
def test_refusals_after_a_right_password_are_no_auth_failures(code: str) -> None:
    # RFC 2449 section 8.1.1: LOGIN-DELAY says "come back later", not "wrong".
    glue = Glue(connect(ServerSettings(max_auth_failures=1)), refusal=(code, "Not now."))
    for _ in range(3):
        assert glue.send(b"USER mrose\r\nPASS tanstaaf\r\n").endswith(
            f"-ERR [{code}] Not now.\r\n".encode()
        )
    assert not glue.closed
    assert glue.conn.state is SessionState.AUTHORIZATION


@pytest.mark.parametrize("command", [b"USER mrose", b"PASS x", b"AUTH PLAIN", b"AUTH LOGIN"])
def test_plaintext_auth_disallowed_without_tls(command: bytes) -> None:
    glue = Glue(connect(plaintext_auth_allowed=False))
    reply = glue.send(command + b"\r\n")
    assert reply == b"-ERR [AUTH] " + PLAINTEXT_DISALLOWED.encode() + b"\r\n"


def test_plaintext_auth_allowed_after_stls() -> None:
    glue = Glue(connect(plaintext_auth_allowed=False), messages=list(MESSAGES))
    assert glue.send(b"STLS\r\n") == b"+OK Begin TLS negotiation now.\r\n"
    assert glue.conn.tls_active
    assert login(glue).endswith(b"octets).\r\n")


def test_apop_disabled_by_default() -> None:
    glue = Glue(connect())
    assert glue.conn.apop_timestamp is None
    assert glue.send(b"APOP mrose " + b"a" * 32 + b"\r\n") == b"-ERR APOP is not enabled.\r\n"


def test_rfc1939_apop_example_digest() -> None:
    timestamp = "<1896.697170952@dbc.mtview.ca.us>"
    assert apop_digest(timestamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"


def test_apop_login() -> None:
    conn = connect(ServerSettings(apop_enabled=True, hostname="pop.example"))
    glue = Glue(conn, messages=list(MESSAGES))
    timestamp = conn.apop_timestamp
    assert timestamp is not None
    assert timestamp.startswith("<")
    assert timestamp.endswith("@pop.example>")
    assert conn.greeting() == f"+OK popbox ready. {timestamp}\r\n".encode()
    digest = apop_digest(timestamp, "tanstaaf").upper().encode()
    assert glue.send(b"APOP mrose " + digest + b"\r\n").startswith(b"+OK Logged in")


def test_apop_wrong_digest() -> None:
    glue = Glue(connect(ServerSettings(apop_enabled=True)))
    assert (
        glue.send(b"APOP mrose " + b"0" * 32 + b"\r\n") == b"-ERR [AUTH] Authentication failed.\r\n"
    )
    assert glue.send(b"APOP mrose nothex\r\n") == b"-ERR Invalid APOP digest\r\n"


# -- SASL (RFC 5034) ----------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_rfc5034_plain_without_initial_response() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    assert glue.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert glue.send(b64(b"\0mrose\0tanstaaf") + b"\r\n").startswith(b"+OK Logged in")
    assert isinstance(glue.events[-2], LoginRequest)
    assert glue.events[-2] == LoginRequest("mrose", "tanstaaf", "PLAIN")


def test_rfc5034_plain_examples() -> None:
    glue = Glue(connect(), users={"test": "test"}, messages=[])
    assert glue.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert glue.send(b"dGVzdAB0ZXN0AHRlc3Q=\r\n").startswith(b"+OK Logged in")
    glue = Glue(connect(), users={"test": "test"}, messages=[])
    assert glue.send(b"AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=\r\n").startswith(b"+OK Logged in")


def test_login_request_repr_hides_the_password() -> None:
    assert "tanstaaf" not in repr(LoginRequest("mrose", "tanstaaf", "PLAIN"))


def test_plain_with_initial_response_and_equal_authzid() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    reply = glue.send(b"AUTH PLAIN " + b64(b"mrose\0mrose\0tanstaaf") + b"\r\n")
    assert reply.startswith(b"+OK Logged in")


def test_plain_with_other_authzid_asks_the_glue_for_that_mailbox() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    reply = glue.send(b"AUTH PLAIN " + b64(b"support\0mrose\0tanstaaf") + b"\r\n")
    assert reply.startswith(b"+OK Logged in")
    assert glue.events[-2] == LoginRequest("mrose", "tanstaaf", "PLAIN", "support")


def test_empty_initial_response_is_equals_sign() -> None:
    glue = Glue(connect())
    # "=" is an empty response: PLAIN cannot be empty, so this is a failure, not a challenge.
    assert glue.send(b"AUTH PLAIN =\r\n") == b"-ERR [AUTH] Invalid PLAIN message\r\n"
    # LOGIN with an empty initial response: an empty user name.
    assert glue.send(b"AUTH LOGIN =\r\n") == b"-ERR [AUTH] Invalid user name\r\n"


def test_login_mechanism_prompts() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    assert glue.send(b"auth login\r\n") == b"+ VXNlcm5hbWU6\r\n"
    assert glue.send(b64(b"mrose") + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert glue.send(b64(b"tanstaaf") + b"\r\n").startswith(b"+OK Logged in")


def test_login_mechanism_with_initial_username() -> None:
    glue = Glue(connect(), messages=list(MESSAGES))
    assert glue.send(b"AUTH LOGIN " + b64(b"mrose") + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert glue.send(b64(b"tanstaaf") + b"\r\n").startswith(b"+OK Logged in")


def test_star_cancels_an_exchange() -> None:
    glue = Glue(connect())
    assert glue.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert glue.send(b"*\r\n") == b"-ERR Authentication cancelled.\r\n"
    # Back to commands: "*" was not taken as a command, and CAPA is a command again.
    assert glue.send(b"CAPA\r\n").startswith(b"+OK Capability list follows")


@pytest.mark.parametrize("response", [b"not base64!", b"YQ", b"YQ===", b"YQ==YQ==", "é".encode()])
def test_invalid_base64_is_an_auth_failure(response: bytes) -> None:
    glue = Glue(connect(ServerSettings(max_auth_failures=2)))
    glue.send(b"AUTH PLAIN\r\n")
    assert glue.send(response + b"\r\n") == b"-ERR [AUTH] Invalid base64 data.\r\n"
    assert not glue.closed
    initial = response.replace(b" ", b"")
    assert glue.send(b"AUTH PLAIN " + initial + b"\r\n") == b"-ERR [AUTH] Invalid base64 data.\r\n"
    assert glue.closed


def test_invalid_utf8_in_sasl_is_an_auth_failure() -> None:
    glue = Glue(connect())
    reply = glue.send(b"AUTH PLAIN " + b64(b"\0m\xffrose\0pw") + b"\r\n")
    assert reply == b"-ERR [AUTH] Invalid UTF-8 in PLAIN message\r\n"


def test_unknown_mechanism() -> None:
    glue = Glue(connect())
    assert glue.send(b"AUTH CRAM-MD5\r\n") == b"-ERR Unsupported authentication mechanism.\r\n"


def test_auth_without_mechanism_lists_them() -> None:
    assert (
        Glue(connect()).send(b"AUTH\r\n") == b"+OK Available mechanisms\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    )
    no_plaintext = Glue(connect(plaintext_auth_allowed=False))
    assert no_plaintext.send(b"AUTH\r\n") == b"+OK Available mechanisms\r\n.\r\n"


def test_sasl_line_limit_is_larger_than_command_limit() -> None:
    settings = ServerSettings(max_command_line=300, max_sasl_line=4000)
    glue = Glue(connect(settings))
    glue.send(b"AUTH PLAIN\r\n")
    token = b64(b"\0mrose\0" + b"p" * 2000)
    assert glue.send(token + b"\r\n") == b"-ERR [AUTH] Authentication failed.\r\n"
    glue.send(b"AUTH PLAIN\r\n")
    assert glue.send(b"A" * 5000 + b"\r\n") == b"-ERR [AUTH] SASL response too long.\r\n"
