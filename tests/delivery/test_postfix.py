"""End to end with a real Postfix: SMTP in, LMTP relay to popbox, Maildir on disk.

Postfix is the MTA popbox is documented to sit behind; these tests run the Debian
package's own smtpd, qmgr and lmtp client against our LmtpService, so the per-
recipient replies, the enhanced status codes and the trace headers are judged by the
client that acts on them in production.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from popbox.auth.passwdfile import PasswdFilePassDB
from popbox.config import Config, Pop3Settings
from popbox.net.service import Pop3Service
from popbox.store.maildir import MaildirStore
from support.lmtp import RunningLmtp, StartLmtp, make_config
from support.postfix import DOMAIN, PostfixInstance, postfix_unavailable, running_postfix

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(postfix_unavailable() is not None, reason=str(postfix_unavailable())),
]

# Bounded waits: Postfix hands a message to LMTP within a second on an idle machine.
DELIVERY_TIMEOUT = 30.0

BODY = (
    b"Plain line.\r\n"
    b".A line starting with a dot (dot-stuffed twice on the way).\r\n"
    b"8-bit: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b"\r\n"
    b"Trailing spaces kept   \r\n"
    b"Last line\r\n"
)
MESSAGE = (
    b"From: Carol <carol@example.net>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: end to end\r\n"
    b"Date: Thu, 26 Nov 2026 06:00:00 +0000\r\n"
    b"Message-ID: <e2e-1@example.net>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + BODY
)


def wait_for(condition: Callable[[], bool], what: str, postfix: PostfixInstance) -> None:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; Postfix log:\n{postfix.log()}")


def send(postfix: PostfixInstance, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=30) as client:
        client.ehlo("client.example.net")
        refused = client.sendmail(sender, recipients, data, mail_options=["BODY=8BITMIME"])
        assert refused == {}


def split_stored(stored: bytes) -> tuple[list[bytes], bytes]:
    """The header lines before MESSAGE's own headers, and everything from them on."""
    start = stored.index(b"From: Carol")
    return stored[:start].split(b"\r\n")[:-1], stored[start:]


PASSWORD = "correct horse"
# The passwd file as an operator writes it: carol's mailbox holds one message at most.
PASSWD = f"""\
alice:{{PLAIN}}{PASSWORD}::::::
bob:{{PLAIN}}{PASSWORD}::::::
carol:{{PLAIN}}{PASSWORD}::::::userdb_quota_rule=*:messages=1
"""


def start_popbox(start_lmtp: StartLmtp, tmp_path: Path, **lmtp: object) -> RunningLmtp:
    """popbox's embedded shape: Maildir store, passwd file, LMTP for example.test."""
    passwd = tmp_path / "passwd"
    passwd.write_text(PASSWD)
    passwd.chmod(0o600)
    store = MaildirStore(tmp_path / "mail")
    config = make_config(tmp_path, domains=[DOMAIN], **lmtp)
    return start_lmtp(config=config, store=store, passdb=PasswdFilePassDB(passwd))


def retrieve_over_pop3(popbox: RunningLmtp, user: str) -> list[bytes]:
    """Log in over POP3 (plaintext is allowed on loopback) and RETR every message."""
    config = Config(pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=[]))
    service = Pop3Service(config, popbox.store, popbox.passdb, None)
    popbox.run(service.start())
    try:
        host, port = service.plain_addresses[0]
        client = poplib.POP3(host, port, timeout=30)
        try:
            client.user(user)
            client.pass_(PASSWORD)
            count, _ = client.stat()
            messages = []
            for number in range(1, count + 1):
                _, lines, _ = client.retr(number)
                messages.append(b"".join(line + b"\r\n" for line in lines))
        finally:
            client.quit()
    finally:
        popbox.run(service.shutdown())
    return messages


def test_postfix_relays_over_lmtp_with_trace_headers_and_exact_body(
    start_lmtp: StartLmtp, tmp_path: Path, shared_tmp: Path
) -> None:
    popbox = start_popbox(start_lmtp, tmp_path)
    with running_postfix(shared_tmp / "postfix", f"inet:127.0.0.1:{popbox.port}") as postfix:
        send(postfix, "carol@example.net", [f"alice@{DOMAIN}"], MESSAGE)
        wait_for(lambda: len(popbox.messages("alice")) == 1, "delivery to alice", postfix)
    (stored,) = popbox.messages("alice")
    prepended, rest = split_stored(stored)
    # Ours first, exactly as Dovecot's LMTP writes them; then Postfix's Received.
    assert prepended[:2] == [
        b"Return-Path: <carol@example.net>",
        b"Delivered-To: alice@example.test",
    ]
    assert prepended[2].startswith(b"Received: from client.example.net")
    assert all(line[:1] in b" \t" for line in prepended[3:])
    # Postfix leaves a complete, dated message alone; so do we: byte for byte.
    assert rest == MESSAGE
    # And a POP3 client downloads exactly that (the stored message is CRLF already).
    assert retrieve_over_pop3(popbox, "alice") == [stored]


def test_postfix_acts_on_each_per_recipient_reply(
    start_lmtp: StartLmtp, tmp_path: Path, shared_tmp: Path
) -> None:
    popbox = start_popbox(start_lmtp, tmp_path)
    popbox.run(popbox.store.deliver("carol", b"Subject: filler\r\n\r\nx\r\n"))
    recipients = [f"{name}@{DOMAIN}" for name in ("alice", "nobody", "carol", "bob")]
    with running_postfix(shared_tmp / "postfix", f"inet:127.0.0.1:{popbox.port}") as postfix:
        # One SMTP transaction, so Postfix's lmtp client sends one LMTP transaction
        # with all four recipients and must match the replies to them.
        send(postfix, "sender@example.net", recipients, MESSAGE)
        wait_for(
            lambda: "to=<carol@example.test>" in postfix.log()
            and "to=<nobody@example.test>" in postfix.log()
            and len(popbox.messages("bob")) == 1,
            "every recipient's outcome",
            postfix,
        )
        log = postfix.log()
    assert len(popbox.messages("alice")) == 1
    assert len(popbox.messages("bob")) == 1
    assert len(popbox.messages("carol")) == 1  # only the filler: the mailbox is full
    assert re.search(r"to=<nobody@example\.test>.*dsn=5\.1\.1, status=bounced", log), log
    assert re.search(r"to=<carol@example\.test>.*dsn=4\.2\.2, status=deferred", log), log
    assert re.search(r"to=<alice@example\.test>.*dsn=2\.0\.0, status=sent", log), log


def test_postfix_over_a_unix_socket(
    start_lmtp: StartLmtp, tmp_path: Path, shared_tmp: Path
) -> None:
    socket_path = shared_tmp / "lmtp" / "popbox.sock"
    socket_path.parent.mkdir()
    socket_path.parent.chmod(0o755)
    popbox = start_popbox(start_lmtp, tmp_path, listen=[], socket=socket_path)
    with running_postfix(shared_tmp / "postfix", f"unix:{socket_path}") as postfix:
        send(postfix, "", [f"Bob+Lists@{DOMAIN}"], MESSAGE)
        wait_for(lambda: len(popbox.messages("bob", "lists")) == 1, "delivery to bob", postfix)
    (stored,) = popbox.messages("bob", "lists")
    prepended, rest = split_stored(stored)
    # A null sender (how bounces travel) becomes Return-Path: <>; the detail stays
    # in Delivered-To, and names the folder the mail lands in (lowercased, as the
    # local part is).
    assert prepended[:2] == [b"Return-Path: <>", b"Delivered-To: Bob+Lists@example.test"]
    assert rest == MESSAGE


def test_address_verification_refuses_unknown_users_during_smtp(
    start_lmtp: StartLmtp, tmp_path: Path, shared_tmp: Path
) -> None:
    # The main.cf that docs/delivery.md recommends: Postfix probes popbox's RCPT
    # answer and refuses an unknown user while the sender is still connected.
    popbox = start_popbox(start_lmtp, tmp_path)
    verify = (
        "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,"
        " reject_unverified_recipient\n"
        "unverified_recipient_reject_code = 550\n"
        # Loopback is in mynetworks here; the probe must still run for this test.
        "mynetworks =\n"
    )
    target = f"inet:127.0.0.1:{popbox.port}"
    with running_postfix(shared_tmp / "postfix", target, verify) as postfix, smtplib.SMTP(
        "127.0.0.1", postfix.smtp_port, timeout=60
    ) as client:
        client.ehlo("client.example.net")
        client.mail("carol@example.net")
        code, text = client.rcpt(f"nobody@{DOMAIN}")
        while code == 450 and b"verification in progress" in text:
            code, text = client.rcpt(f"nobody@{DOMAIN}")
        assert code == 550, text
        assert b"5.1.1" in text
        code, text = client.rcpt(f"alice@{DOMAIN}")
        while code == 450 and b"verification in progress" in text:
            code, text = client.rcpt(f"alice@{DOMAIN}")
        assert code == 250, text
        client.data(MESSAGE)
        wait_for(lambda: len(popbox.messages("alice")) == 1, "delivery to alice", postfix)
