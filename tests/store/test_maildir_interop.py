"""The Maildir store against real Maildir software: Dovecot (LDA and POP3) and getmail.

A Maildir is shared ground: Dovecot's LDA or getmail may write into it, and an
operator may point Dovecot at a Maildir popbox filled. These tests run the real
programs from Debian packages and skip, with the reason, where they are missing.
"""

from __future__ import annotations

import os
import poplib
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from popbox.store import MaildirStore
from popbox.wireform import wire_size
from support.dovecot import MAIL_GID, MAIL_UID, DovecotServer
from support.maildrop import message_files, read_all

DOVECOT_LDA = "/usr/lib/dovecot/deliver"
GETMAIL_MAILDIR = shutil.which("getmail_maildir")

MESSAGES = [
    b"From: a@example.org\nSubject: bare LF\n\nbody line\n.starts with a dot\n",
    b"From: b@example.org\r\nSubject: CRLF\r\n\r\nbody\r\n",
    b"From: c@example.org\nSubject: no final line end\n\nlast line",
    b"From: d@example.org\nSubject: 8-bit\n\n\xe9t\xe9 \x00 NUL\n",
]


@pytest.fixture
def dovecot(dovecot: DovecotServer) -> DovecotServer:
    """The shared private Dovecot (tests/conftest.py); these tests need its LDA too."""
    if not Path(DOVECOT_LDA).exists():
        pytest.skip("dovecot-lda is not installed (apt-get install dovecot-core)")
    return dovecot


def chown_tree(path: Path) -> None:
    """Hand popbox's files to the mail user, as a popbox running as that user leaves them."""
    for directory, _, files in os.walk(path):
        os.chown(directory, MAIL_UID, MAIL_GID)
        for name in files:
            os.chown(Path(directory) / name, MAIL_UID, MAIL_GID)


def files_in_delivery_order(maildir: Path) -> list[bytes]:
    return [path.read_bytes() for path in message_files(maildir)]


async def test_popbox_reads_what_dovecot_lda_delivers(dovecot: DovecotServer) -> None:
    for message in MESSAGES:
        subprocess.run(
            [DOVECOT_LDA, "-c", str(dovecot.config_path), "-d", "alice"],
            input=message,
            check=True,
            timeout=60,
        )
    maildir = dovecot.maildir("alice")
    names = [p.name for p in (maildir / "new").iterdir()]
    assert all(",S=" in name and ",W=" in name for name in names), names
    stored = files_in_delivery_order(maildir)
    store = MaildirStore(maildir.parent)
    maildrop = await store.open_maildrop("alice")
    # Sizes come from Dovecot's W= without opening the files. W= leaves out the CRLF
    # RETR adds after an unterminated last line, so for such a message popbox's LIST
    # says what Dovecot's LIST says: 2 octets short (a documented limit).
    shortfall = [0 if m.endswith(b"\n") else 2 for m in stored]
    assert [info.size for info in maildrop.messages] == [
        wire_size(m) - short for m, short in zip(stored, shortfall, strict=True)
    ]
    assert [await read_all(maildrop, i) for i in range(len(stored))] == stored
    uidls = [info.uidl for info in maildrop.messages]
    await maildrop.release()
    # Dovecot's own bookkeeping beside cur/ and new/ is left alone and not mail.
    assert (maildir / "dovecot-uidlist").exists()
    again = await MaildirStore(maildir.parent).open_maildrop("alice")
    assert [info.uidl for info in again.messages] == uidls
    await again.release()


@pytest.mark.parametrize("save_crlf", [True, False], ids=["crlf", "as-received"])
async def test_dovecot_serves_what_popbox_delivered(
    dovecot: DovecotServer, tls_files: Any, save_crlf: bool
) -> None:
    # storage.save_crlf (the default) stores CRLF, as Dovecot's mail_save_crlf does.
    store = MaildirStore(dovecot.maildir("alice").parent, save_crlf=save_crlf)
    for message in MESSAGES:
        await store.deliver("alice", message)
    maildrop = await store.open_maildrop("alice")  # indexes, moves new/ to cur/
    ours = [info.size for info in maildrop.messages]
    await maildrop.release()
    chown_tree(dovecot.maildir("alice"))
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    client = poplib.POP3_SSL("127.0.0.1", dovecot.pop3s_port, context=context, timeout=30)
    try:
        client.user("alice")
        client.pass_("secret")
        _, listing, _ = client.list()
        theirs = [int(line.split()[1]) for line in listing]
        bodies = [b"\r\n".join(client.retr(n + 1)[1]) + b"\r\n" for n in range(len(MESSAGES))]
    finally:
        client.quit()
    wire = [m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in MESSAGES]
    wire = [w if w.endswith(b"\r\n") else w + b"\r\n" for w in wire]
    assert bodies == wire
    # popbox counts the CRLF RETR adds after an unterminated last line, as RFC 1939
    # asks; Dovecot does not, so it differs there (popbox wrote no W= for it).
    assert ours == [wire_size(m) for m in MESSAGES]
    assert theirs == [
        size - (0 if m.endswith(b"\n") else 2) for size, m in zip(ours, MESSAGES, strict=True)
    ]


async def test_popbox_reads_what_getmail_delivers(shared_tmp: Path) -> None:
    tmp_path = shared_tmp
    if GETMAIL_MAILDIR is None:
        pytest.skip("getmail_maildir is not installed (apt-get install getmail6)")
    if os.geteuid() != 0:
        pytest.skip("getmail_maildir refuses root; the test switches to the mail user")
    store = MaildirStore(tmp_path / "mail")
    await store.deliver("alice", b"Subject: first, from popbox\n\nhello\n")
    maildir = store.maildir("alice")
    for path in (tmp_path, tmp_path / "mail"):
        path.chmod(0o755)
    chown_tree(maildir)
    as_mail = ["setpriv", f"--reuid={MAIL_UID}", f"--regid={MAIL_GID}", "--clear-groups"]
    for message in MESSAGES:
        subprocess.run(
            [*as_mail, GETMAIL_MAILDIR, f"{maildir}/"],
            input=message,
            check=True,
            timeout=60,
        )
    stored = files_in_delivery_order(maildir)
    maildrop = await store.open_maildrop("alice")
    assert len(maildrop.messages) == 1 + len(MESSAGES)
    read = [await read_all(maildrop, i) for i in range(len(stored))]
    assert sorted(read) == sorted(stored)
    for info, body in zip(maildrop.messages, read, strict=True):
        assert info.size == wire_size(body)
    await maildrop.release()
