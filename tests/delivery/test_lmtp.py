"""LMTP conversations with smtplib.LMTP and raw sockets against a running LmtpService.

Each test is a conversation an MTA could have; the assertions are the replies an MTA
acts on (retry, bounce, done) and what the mailbox holds afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from popbox.auth.base import UserRecord
from popbox.config import QuotaSettings
from popbox.delivery.lmtp import AIOSMTPD_LOGGER
from popbox.errors import AuthError, StoreError
from popbox.store.memory import MemoryStore
from support.lmtp import RunningLmtp, StartLmtp, make_config, users

MESSAGE = (
    b"From: Carol <carol@example.net>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"First line.\r\n"
    b"..a line that starts with a dot\r\n"
    b"Last line.\r\n"
)


def connect(server: RunningLmtp) -> smtplib.LMTP:
    client = smtplib.LMTP(server.host, server.port, timeout=10)
    code, _ = client.ehlo("mta.example.net")
    assert code == 250
    return client


def transaction(
    server: RunningLmtp, sender: str, recipients: list[str], data: bytes
) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """One LMTP transaction: the RCPT replies and every reply to the final dot.

    smtplib.LMTP.data reads only the first per-recipient reply (CPython gh-76984), so
    the others are read with getreply(), as RFC 2033 section 4.2 lays them out.
    """
    with connect(server) as client:
        assert client.mail(sender)[0] == 250
        rcpt = [client.rcpt(address) for address in recipients]
        accepted = sum(1 for code, _ in rcpt if code == 250)
        replies: list[tuple[int, bytes]] = []
        if accepted:
            replies.append(client.data(data))
            replies.extend(client.getreply() for _ in range(accepted - 1))
        client.quit()
    return rcpt, replies


def test_delivery_adds_trace_headers_and_keeps_the_message_byte_for_byte(
    start_lmtp: StartLmtp,
) -> None:
    server = start_lmtp()
    rcpt, replies = transaction(server, "carol@example.net", ["alice@example.test"], MESSAGE)
    assert rcpt == [(250, b"2.1.5 Ok")]
    assert len(replies) == 1
    assert replies[0][0] == 250
    assert replies[0][1].startswith(b"2.0.0 <alice@example.test> Saved")
    assert server.messages("alice") == [
        b"Return-Path: <carol@example.net>\r\n"
        b"Delivered-To: alice@example.test\r\n" + MESSAGE
    ]


def test_mixed_outcomes_in_one_transaction_get_one_reply_per_recipient(
    start_lmtp: StartLmtp,
) -> None:
    store = MemoryStore()
    passdb = users("alice", "bob", carol=UserRecord("carol", quota_messages=1))
    server = start_lmtp(store=store, passdb=passdb)
    server.run(store.deliver("carol", b"Subject: already here\r\n\r\nx\r\n"))
    rcpt, replies = transaction(
        server,
        "sender@example.net",
        ["alice@example.test", "nobody@example.test", "carol@example.test", "bob@example.test"],
        MESSAGE,
    )
    assert [code for code, _ in rcpt] == [250, 550, 250, 250]
    assert rcpt[1][1].startswith(b"5.1.1 <nobody@example.test>")
    # Three accepted recipients, three replies, in RCPT order.
    assert [code for code, _ in replies] == [250, 452, 250]
    assert replies[1][1].startswith(b"4.2.2 <carol@example.test> Quota exceeded")
    assert len(server.messages("alice")) == 1
    assert len(server.messages("bob")) == 1
    assert len(server.messages("carol")) == 1


@pytest.mark.parametrize(
    ("policy", "expected"), [("temporary", (452, b"4.2.2")), ("permanent", (552, b"5.2.2"))]
)
def test_over_quota_is_temporary_or_permanent_as_configured(
    start_lmtp: StartLmtp, policy: str, expected: tuple[int, bytes]
) -> None:
    config = make_config(quota=QuotaSettings(octets=200, over_quota=policy))  # type: ignore[arg-type]
    server = start_lmtp(config=config)
    big = MESSAGE + b"x" * 200 + b"\r\n"
    _, replies = transaction(server, "s@example.net", ["alice@example.test"], big)
    code, text = replies[0]
    assert (code, text[:5]) == expected
    assert server.messages("alice") == []
    # A message that fits still goes in: the quota is about the total, not a ban.
    _, replies = transaction(server, "s@example.net", ["alice@example.test"], b"Hi\r\n")
    assert replies[0][0] == 250


def test_per_user_quota_overrides_the_default(start_lmtp: StartLmtp) -> None:
    config = make_config(quota=QuotaSettings(messages=1))
    passdb = users("alice", bob=UserRecord("bob", quota_messages=0))
    server = start_lmtp(config=config, passdb=passdb)
    for _ in range(2):
        transaction(server, "s@example.net", ["alice@example.test", "bob@example.test"], MESSAGE)
    # alice has the default (1 message); bob's 0 means no limit.
    assert len(server.messages("alice")) == 1
    assert len(server.messages("bob")) == 2


def test_unknown_user_and_foreign_domain_are_refused_at_rcpt(start_lmtp: StartLmtp) -> None:
    server = start_lmtp(config=make_config(domains=["example.test"]))
    with connect(server) as client:
        client.mail("s@example.net")
        assert client.rcpt("nobody@example.test")[0] == 550
        assert client.rcpt("alice@elsewhere.example")[0] == 550
        assert client.rcpt("../alice@example.test")[0] == 550
        # Nothing accepted: DATA is refused outright, there is no one to reply for.
        assert client.docmd("DATA")[0] == 503


def test_recipient_delimiter_and_case_map_to_the_user(start_lmtp: StartLmtp) -> None:
    server = start_lmtp()
    _, replies = transaction(server, "", ["Alice+Lists@Example.TEST"], MESSAGE)
    assert replies[0][0] == 250
    # The detail is a folder (mailbox.folder_delivery = "create", the default).
    (stored,) = server.messages("alice", "lists")
    # Null sender (a bounce) and the address exactly as the MTA gave it.
    assert stored.startswith(b"Return-Path: <>\r\nDelivered-To: Alice+Lists@Example.TEST\r\n")


def test_repeated_recipient_gets_every_reply_but_one_copy(start_lmtp: StartLmtp) -> None:
    server = start_lmtp()
    _, replies = transaction(
        server, "s@example.net", ["alice@example.test", "alice@example.test"], MESSAGE
    )
    assert [code for code, _ in replies] == [250, 250]
    assert len(server.messages("alice")) == 1


def test_too_big_is_refused_for_every_recipient_and_stores_nothing(
    start_lmtp: StartLmtp,
) -> None:
    server = start_lmtp(config=make_config(max_message_size=1000))
    with connect(server) as client:
        assert b"SIZE 1000" in (client.ehlo_resp or b"")
        # Declared too big: refused before any data is sent.
        code, text = client.docmd("MAIL FROM:<s@example.net> SIZE=5000")
        assert (code, text[:5]) == (552, b"5.3.4")
    big = MESSAGE + (b"y" * 70 + b"\r\n") * 20
    _, replies = transaction(
        server, "s@example.net", ["alice@example.test", "bob@example.test"], big
    )
    assert [(code, text[:5]) for code, text in replies] == [(552, b"5.3.4")] * 2
    assert server.messages("alice") == []
    assert server.messages("bob") == []
    # The session is not out of step: the next message on a new transaction works.
    _, replies = transaction(server, "s@example.net", ["alice@example.test"], MESSAGE)
    assert replies[0][0] == 250


def test_lhlo_advertises_what_an_mta_needs(start_lmtp: StartLmtp) -> None:
    server = start_lmtp()
    with connect(server) as client:
        for extension in ("8bitmime", "smtputf8", "size", "enhancedstatuscodes", "pipelining"):
            assert client.has_extn(extension), extension
        assert client.esmtp_features["size"] == str(100 * 1024 * 1024)


def test_bad_commands_get_errors_and_the_session_goes_on(start_lmtp: StartLmtp) -> None:
    server = start_lmtp()
    client = smtplib.LMTP(server.host, server.port, timeout=10)
    try:
        # LMTP has no HELO or EHLO (RFC 2033 section 4.1); nothing works before LHLO.
        assert client.docmd("HELO", "mta")[0] == 500
        assert client.docmd("EHLO", "mta")[0] == 500
        assert client.docmd("MAIL", "FROM:<s@example.net>")[0] == 503
        assert client.ehlo("mta")[0] == 250
        assert client.docmd("RCPT", "TO:<alice@example.test>")[0] == 503
        assert client.docmd("DATA")[0] == 503
        assert client.docmd("MAIL", "FROM:<s@example.net> BODY=9BIT")[0] == 501
        assert client.docmd("MAIL", "FROM:<s@example.net>")[0] == 250
        assert client.docmd("MAIL", "FROM:<s@example.net>")[0] == 503
        # Malformed (553) or naming no user (550): a permanent refusal either way.
        assert client.docmd("RCPT", "TO:<not an address")[0] in {550, 553}
        assert client.docmd("RCPT", "TO:<>")[0] in {550, 553}
        assert client.docmd("RCPT", "TO:<alice@example.test>")[0] == 250
        assert client.docmd("RSET")[0] == 250
        assert client.docmd("DATA")[0] == 503
        assert client.noop()[0] == 250
    finally:
        client.close()


def _raw(server: RunningLmtp) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.makefile("rb").readline()
    return sock


def _read_replies(sock: socket.socket, count: int) -> list[bytes]:
    reader = sock.makefile("rb")
    replies: list[bytes] = []
    while len(replies) < count:
        line = reader.readline()
        assert line, f"connection closed after {replies!r}"
        if line[3:4] != b"-":
            replies.append(line.rstrip(b"\r\n"))
    return replies


def test_client_that_drops_mid_data_delivers_nothing(start_lmtp: StartLmtp) -> None:
    server = start_lmtp()
    sock = _raw(server)
    sock.sendall(
        b"LHLO mta\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    )
    replies = _read_replies(sock, 4)
    assert replies[-1].startswith(b"354")
    sock.sendall(MESSAGE[:40])
    sock.close()
    # A later, complete delivery is the marker that the server went past the drop.
    transaction(server, "s@example.net", ["bob@example.test"], MESSAGE)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and server.service.sessions:
        time.sleep(0.05)
    assert server.messages("alice") == []
    assert len(server.messages("bob")) == 1


def test_pipelined_commands_and_exact_8bit_bytes(start_lmtp: StartLmtp) -> None:
    server = start_lmtp()
    body = (
        b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe, raw 8-bit: \x80\xfe\xff\r\n"
        b"bare CR\rinside a line\r\n"
        + b"L" * 5000
        + b"\r\n"
    )
    sock = _raw(server)
    # Everything up to DATA in one write, as a PIPELINING client sends it.
    sock.sendall(
        b"LHLO mta\r\nMAIL FROM:<s@example.net> BODY=8BITMIME\r\n"
        b"RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    assert [r[:3] for r in _read_replies(sock, 5)] == [b"250", b"250", b"250", b"250", b"354"]
    sock.sendall(body + b".\r\nQUIT\r\n")
    replies = _read_replies(sock, 3)
    assert [r[:9] for r in replies] == [b"250 2.0.0", b"250 2.0.0", b"221 Bye"]
    sock.close()
    trace = b"Return-Path: <s@example.net>\r\nDelivered-To: %s@example.test\r\n"
    assert server.messages("alice") == [trace % b"alice" + body]
    assert server.messages("bob") == [trace % b"bob" + body]


def test_smtputf8_recipient_and_sender(start_lmtp: StartLmtp) -> None:
    server = start_lmtp(passdb=users("alice"))
    with connect(server) as client:
        assert client.mail("j\u00f6rg@example.net", ["SMTPUTF8"])[0] == 250
        assert client.rcpt("alice+\u00fcber@example.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    (stored,) = server.messages("alice")
    assert stored.startswith(
        "Return-Path: <j\u00f6rg@example.net>\r\n"
        "Delivered-To: alice+\u00fcber@example.test\r\n".encode()
    )


class _BrokenStore(MemoryStore):
    async def deliver(self, user: str, message: bytes, **options: object) -> str:
        raise StoreError("disk on fire")


class _BrokenPassDB:
    async def verify(self, username: str, password: str) -> UserRecord | None:
        raise AuthError("database down")

    async def lookup(self, username: str) -> UserRecord | None:
        raise AuthError("database down")

    async def plaintext_secret(self, username: str) -> str | None:
        return None


def test_our_own_faults_are_temporary(start_lmtp: StartLmtp) -> None:
    server = start_lmtp(store=_BrokenStore())
    _, replies = transaction(server, "s@example.net", ["alice@example.test"], MESSAGE)
    assert (replies[0][0], replies[0][1][:5]) == (451, b"4.3.0")
    assert b"fire" not in replies[0][1]  # the cause goes to the log, not the MTA
    broken_users = start_lmtp(passdb=_BrokenPassDB())
    with connect(broken_users) as client:
        client.mail("s@example.net")
        code, text = client.rcpt("alice@example.test")
        assert (code, text[:5]) == (451, b"4.3.0")


def test_unix_socket_listener(start_lmtp: StartLmtp, tmp_path: Path) -> None:
    path = tmp_path / "run" / "lmtp.sock"
    server = start_lmtp(config=make_config(listen=[], socket=path))
    assert server.service.socket_path == path
    assert server.service.addresses == []
    client = smtplib.LMTP(str(path), timeout=10)
    try:
        assert client.ehlo("mta")[0] == 250
        assert client.mail("s@example.net")[0] == 250
        assert client.rcpt("alice")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    finally:
        client.quit()
    assert len(server.messages("alice")) == 1
    server.stop()
    assert not path.exists()


def test_line_over_the_limit_is_refused_for_each_recipient(start_lmtp: StartLmtp) -> None:
    server = start_lmtp()
    huge_line = b"x" * (1024 * 1024 + 10) + b"\r\n"
    _, replies = transaction(
        server, "s@example.net", ["alice@example.test", "bob@example.test"], MESSAGE + huge_line
    )
    assert [(code, text[:5]) for code, text in replies] == [(552, b"5.3.4")] * 2
    assert server.messages("alice") == []


class _SlowStore(MemoryStore):
    """A store whose writes take a while, like an fsync on a busy disk."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    async def deliver(
        self, user: str, message: bytes, *, folder: str = "INBOX", **options: str | None
    ) -> str:
        self.started.set()
        await asyncio.sleep(0.3)
        return await super().deliver(user, message, folder=folder, **options)


def test_hangup_after_the_final_dot_still_completes_the_delivery(
    start_lmtp: StartLmtp,
) -> None:
    # The data is complete, so the message is whole: storing it is right, and the
    # MTA (which never saw the 250) sending it again costs a duplicate, not a loss.
    store = _SlowStore()
    server = start_lmtp(store=store)
    sock = _raw(server)
    sock.sendall(
        b"LHLO mta\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    )
    _read_replies(sock, 4)
    sock.sendall(MESSAGE + b".\r\n")
    assert store.started.wait(10)
    sock.close()
    # stop() waits for deliveries in progress before it closes sessions.
    server.run(server.service.stop())
    assert len(server.messages("alice")) == 1


def test_aiosmtpd_command_chatter_stays_out_of_an_info_log(
    start_lmtp: StartLmtp, caplog: pytest.LogCaptureFixture
) -> None:
    """One line per delivery at INFO, popbox's own, as Dovecot's LMTP logs it; not
    aiosmtpd's five (every command, every connection event)."""
    chatty = logging.getLogger(AIOSMTPD_LOGGER)
    level = chatty.level
    chatty.setLevel(logging.NOTSET)
    try:
        with caplog.at_level(logging.INFO):
            server = start_lmtp()
            transaction(server, "carol@example.net", ["alice@example.test"], MESSAGE)
        names = [record.name for record in caplog.records]
        assert "popbox.delivery" in names
        assert AIOSMTPD_LOGGER not in names
        # aiosmtpd's warnings and errors still come.
        assert chatty.getEffectiveLevel() == logging.WARNING
        # An operator at DEBUG gets it all.
        chatty.setLevel(logging.NOTSET)
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            server = start_lmtp()
            transaction(server, "carol@example.net", ["alice@example.test"], MESSAGE)
        assert AIOSMTPD_LOGGER in [record.name for record in caplog.records]
    finally:
        chatty.setLevel(level)
