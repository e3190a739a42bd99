"""Mail locations: Dovecot's mail_location syntax, path tricks refused, and the Maildir
store delivering into and reading from a Dovecot-style tree (a real Dovecot's too)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from popbox.errors import PermanentStoreError
from popbox.store import MaildirStore
from popbox.store.location import UnderRoot, UserHome, UserLocations, parse_location
from popbox.store.mailbox import MailboxView
from support.dovecot import MAIL_GID, MAIL_UID, DovecotServer
from support.maildrop import read_all

DOVECOT_LDA = "/usr/lib/dovecot/deliver"


def expand(text: str, user: str, home: str = "") -> Path:
    return parse_location(text, source="test").expand(user, home)


@pytest.mark.parametrize(
    ("location", "user", "home", "expected"),
    [
        ("maildir:/vmail/%d/%n/Maildir", "alice@example.org", "", "/vmail/example.org/alice/Maildir"),  # noqa: E501
        ("/vmail/%{domain}/%{username}", "alice@example.org", "", "/vmail/example.org/alice"),
        ("maildir:/srv/mail/%u", "alice@example.org", "", "/srv/mail/alice@example.org"),
        ("maildir:/srv/mail/%{user}", "bob", "", "/srv/mail/bob"),
        ("maildir:~/Maildir", "bob", "/home/bob", "/home/bob/Maildir"),
        ("maildir:%h/Maildir:LAYOUT=maildir++", "bob", "/home/bob", "/home/bob/Maildir"),
        ("maildir:%{home}/mail:INDEX=/idx/%u:CONTROL=/ctl/%u", "bob", "/h/bob", "/h/bob/mail"),
        ("/srv/100%%/%n", "bob", "", "/srv/100%/bob"),
        ("/srv/%n", "bob", "", "/srv/bob"),  # %n is all of a name without '@'
    ],
)
def test_dovecot_variables(location: str, user: str, home: str, expected: str) -> None:
    assert expand(location, user, home) == Path(expected)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("mbox:~/mail:INBOX=/var/mail/%u", "mail format 'mbox' is not supported"),
        ("mdbox:~/mdbox", "mail format 'mdbox' is not supported"),
        ("maildir:~/Maildir:LAYOUT=fs", "'LAYOUT=fs' is not supported"),
        ("maildir:~/Maildir:INBOX=/var/mail/%u", "'INBOX=/var/mail/%u' is not supported"),
        ("maildir:Maildir", "must be an absolute path"),
        ("maildir:/var/vmail/%x", "unknown variable '%x'"),
        ("maildir:/var/vmail/%{service}", "unknown variable '%{service}'"),
        ("maildir:", "no path"),
        ("", "empty"),
    ],
)
def test_what_popbox_cannot_read_is_refused_naming_the_setting(
    location: str, message: str
) -> None:
    with pytest.raises(ValueError, match=r"^test: ") as caught:
        parse_location(location, source="test")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("location", "user", "home", "why"),
    [
        ("/var/vmail/%d/%n", "alice@..", "", "domain that cannot be a directory"),
        ("/var/vmail/%d/%n", "alice@.hidden", "", "domain that cannot be a directory"),
        ("/var/vmail/%d/%n", "@example.org", "", "user part that cannot be a directory"),
        ("/var/vmail/%d/%n", "alice", "", "has no domain for %d"),
        ("~/Maildir", "alice", "", "has no home directory"),
        ("%h/Maildir", "alice", "relative/home", "is not an absolute path"),
        ("%h/Maildir", "alice", "/home/../etc", "holds '.' or '..'"),
        ("/var/vmail/%u", "..", "", "name that cannot be a directory"),
    ],
)
def test_path_tricks_are_refused(location: str, user: str, home: str, why: str) -> None:
    with pytest.raises(PermanentStoreError, match=re.escape(why)):
        expand(location, user, home)


def test_the_users_own_field_wins_and_a_changed_home_moves_the_maildir(tmp_path: Path) -> None:
    homes = {
        "alice@example.org": UserHome(),
        "bob": UserHome(home="/home/bob", mail="maildir:~/Mail"),
        "carol": UserHome(home="/home/carol"),
    }
    default = parse_location("maildir:/var/vmail/%d/%n/Maildir", source="storage.mail_location")
    locations = UserLocations(homes.get, default=default, root=tmp_path)
    assert locations.maildir("alice@example.org") == Path("/var/vmail/example.org/alice/Maildir")
    assert locations.maildir("bob") == Path("/home/bob/Mail")
    with pytest.raises(PermanentStoreError, match=r"carol.*has no domain"):
        locations.maildir("carol")
    homes["bob"] = UserHome(home="/home/robert", mail="maildir:~/Mail")
    assert locations.maildir("bob") == Path("/home/robert/Mail")
    homes["bob"] = UserHome(mail="mbox:~/mail")
    with pytest.raises(PermanentStoreError, match="mail field: mail format 'mbox'"):
        locations.maildir("bob")
    # Without a template, users without a field stay where they always were.
    plain = UserLocations(homes.get, default=None, root=tmp_path)
    assert plain.maildir("carol") == tmp_path / "carol"
    assert UnderRoot(tmp_path).maildir("carol") == tmp_path / "carol"


async def test_store_delivers_into_the_template_and_reads_it_back(tmp_path: Path) -> None:
    vmail = tmp_path / "vmail"
    location = UserLocations(
        lambda user: None,
        default=parse_location(f"maildir:{vmail}/%d/%n/Maildir", source="test"),
        root=tmp_path / "unused",
    )
    store = MaildirStore(tmp_path / "unused", location=location)
    await store.deliver("alice@example.org", b"Subject: one\n\nhello\n")
    await store.deliver("alice@example.org", b"Subject: two\n\nhello\n", folder="Lists")
    maildir = vmail / "example.org" / "alice" / "Maildir"
    assert [p.parent.name for p in maildir.glob("new/*")] == ["new"]
    assert (maildir / ".Lists" / "maildirfolder").exists()
    for directory in (vmail / "example.org", vmail / "example.org" / "alice", maildir):
        assert os.stat(directory).st_mode & 0o777 == 0o700
    assert not (tmp_path / "unused").exists()
    maildrop = await store.open_maildrop("alice@example.org")
    assert [await read_all(maildrop, 0)] == [b"Subject: one\n\nhello\n"]
    await maildrop.release()
    assert await store.folders("alice@example.org") == ["INBOX", "Lists"]
    assert (await store.usage("alice@example.org")).messages == 2


async def test_dovecot_control_and_index_files_are_not_mail(tmp_path: Path) -> None:
    maildir = tmp_path / "alice"
    for sub in ("cur", "new", "tmp", ".Trash/cur", ".Trash/new", ".Trash/tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1700000000.M1P1.host,S=20,W=21").write_bytes(b"Subject: x\n\nbody..\n")
    for name in (
        "dovecot-uidlist",
        "dovecot-uidvalidity",
        "dovecot-uidvalidity.65a1b2c3",
        "dovecot-keywords",
        "dovecot.index",
        "dovecot.index.log",
        "dovecot.index.cache",
        "dovecot.list.index.log",
        "subscriptions",
    ):
        (maildir / name).write_bytes(b"3 V1700000000 N2\n1 :1700000000.M1P1.host\n")
        (maildir / ".Trash" / name).write_bytes(b"dovecot's own\n")
    (maildir / ".Trash" / "maildirfolder").touch()
    store = MaildirStore(tmp_path)
    maildrop = await store.open_maildrop("alice")
    assert len(maildrop.messages) == 1
    await maildrop.release()
    trash = await store.open_maildrop("alice", MailboxView("Trash"))
    assert trash.messages == []
    await trash.release()
    assert (maildir / "dovecot-uidlist").read_bytes().startswith(b"3 V")


async def test_popbox_reads_a_tree_dovecot_delivered_into_by_domain(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """Dovecot's LDA fills /…/%d/%n/Maildir (INBOX and a folder, with its uidlist and
    indexes); popbox, given the same mail_location, reads both in place."""
    if not Path(DOVECOT_LDA).exists():
        pytest.skip("dovecot-lda is not installed (apt-get install dovecot-core)")
    user = "carol@example.org"
    dovecot.add_user(user, "pw")
    vmail = dovecot.root / "vmail"
    vmail.mkdir(exist_ok=True)
    os.chown(vmail, MAIL_UID, MAIL_GID)
    template = f"maildir:{vmail}/%d/%n/Maildir"
    maildir = vmail / "example.org" / "carol" / "Maildir"
    for folder, body in (("INBOX", b"to the inbox\n"), ("Lists", b"to a list\n")):
        done = subprocess.run(
            [
                DOVECOT_LDA,
                "-c", str(dovecot.config_path),
                # -o values are not expanded: Dovecot gets the path %d/%n names.
                "-o", f"mail_location=maildir:{maildir}",
                "-o", "lda_mailbox_autocreate=yes",
                "-d", user,
                "-m", folder,
            ],
            input=b"From: x@example.net\nSubject: s\n\n" + body,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode() + dovecot.log()[-2000:]
    assert (maildir / "dovecot-uidlist").exists()
    assert (maildir / ".Lists" / "dovecot-uidlist").exists()
    location = UserLocations(
        lambda name: None, default=parse_location(template, source="test"), root=tmp_path
    )
    store = MaildirStore(tmp_path, location=location)
    assert await store.folders(user) == ["INBOX", "Lists"]
    for folder, body in (("INBOX", b"to the inbox\n"), ("Lists", b"to a list\n")):
        maildrop = await store.open_maildrop(user, MailboxView(folder))
        assert len(maildrop.messages) == 1
        assert (await read_all(maildrop, 0)).endswith(body)
        await maildrop.release()
