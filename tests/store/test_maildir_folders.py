"""MaildirStore's folders on disk: Maildir++ as Dovecot and Courier lay it out.

INBOX is the user's Maildir; a folder is ``.NAME`` inside it with cur/, new/, tmp/
and a ``maildirfolder`` file; a message moved to Trash keeps its sizes and flags
under a name that starts with the time of the move. Names that could lead outside
the user's Maildir are refused, and a symlink planted as a folder is not followed.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from popbox.errors import InvalidMailboxName, NoSuchFolder, PermanentStoreError
from popbox.store import MaildirStore
from popbox.store.mailbox import Disposition, MailboxPolicy, MailboxView
from popbox.store.maildir_folders import FOLDER_MARKER
from support.dovecot import MAIL_GID, MAIL_UID, DovecotServer
from support.maildrop import read_all, stored_messages

TRASHING = MailboxPolicy(disposition=Disposition.TRASH)


async def test_a_folder_is_a_maildir_plus_plus_folder(maildir_store: MaildirStore) -> None:
    await maildir_store.deliver("alice", b"Subject: invoice\n\npay\n", folder="invoices")
    await maildir_store.deliver("alice", b"Subject: nested\n\nlist mail\n", folder="lists.python")
    inbox = maildir_store.maildir("alice")
    for folder in (".invoices", ".lists.python"):
        path = inbox / folder
        assert maildir_store.maildir("alice", folder[1:]) == path
        for sub in ("cur", "new", "tmp"):
            assert stat.S_IMODE((path / sub).stat().st_mode) == 0o700
        assert (path / FOLDER_MARKER).read_bytes() == b""
        assert len(os.listdir(path / "new")) == 1
    for sub in ("cur", "new", "tmp"):  # INBOX is the user's Maildir itself
        assert (inbox / sub).is_dir()
    assert await maildir_store.folders("alice") == ["INBOX", "invoices", "lists.python"]
    assert await stored_messages(maildir_store, "alice") == []
    maildrop = await maildir_store.open_maildrop("alice", MailboxView(folder="invoices"))
    assert [await read_all(maildrop, 0)] == [b"Subject: invoice\n\npay\n"]
    await maildrop.release()
    assert (await maildir_store.usage("alice")).messages == 2  # every folder counts


async def test_a_move_to_trash_keeps_sizes_and_flags_under_a_name_of_its_time(
    maildir_store: MaildirStore, clock: Callable[[], float]
) -> None:
    dovecot_name = "1700000001.M20P30.mail.example,S=23,W=24:2,S"
    inbox = maildir_store.maildir("alice")
    for sub in ("cur", "new", "tmp"):
        (inbox / sub).mkdir(parents=True)
    (inbox / "cur" / dovecot_name).write_bytes(b"Subject: old\n\nseen it\n")
    maildrop = await maildir_store.open_maildrop("alice", MailboxView(policy=TRASHING))
    await maildrop.commit_deletions([0])
    assert os.listdir(inbox / "cur") == []
    (moved,) = os.listdir(inbox / ".Trash" / "cur")
    base, _, flags = moved.partition(":")
    assert flags == "2,S"
    assert base.endswith(",S=23,W=24")
    assert abs(int(base.partition(".")[0]) - clock()) <= 2  # the time of the move
    assert (inbox / ".Trash" / FOLDER_MARKER).exists()
    assert await maildir_store.folders("alice") == ["INBOX", "Trash"]
    trash = await maildir_store.open_maildrop("alice", MailboxView(folder="Trash"))
    assert [await read_all(trash, 0)] == [b"Subject: old\n\nseen it\n"]
    assert [info.size for info in trash.messages] == [24]  # W= still spares a read
    await trash.release()


@pytest.mark.parametrize(
    "folder", ["../bob", "..", ".hidden", "a/b", "a..b", "trailing.", "x" * 101, "nul\x00"]
)
async def test_folder_names_that_leave_the_maildir_are_refused(
    maildir_store: MaildirStore, tmp_path: Path, folder: str
) -> None:
    with pytest.raises(InvalidMailboxName):
        await maildir_store.deliver("alice", b"x\n", folder=folder)
    with pytest.raises(InvalidMailboxName):
        await maildir_store.open_maildrop("alice", MailboxView(folder=folder))
    assert not (tmp_path / "mail").exists() or os.listdir(tmp_path / "mail") == []


async def test_a_folder_that_does_not_exist_is_not_made_by_a_login(
    maildir_store: MaildirStore,
) -> None:
    await maildir_store.deliver("alice", b"x\n")
    with pytest.raises(NoSuchFolder):
        await maildir_store.open_maildrop("alice", MailboxView(folder="Archive"))
    assert not (maildir_store.maildir("alice") / ".Archive").exists()
    # INBOX in any case is the Maildir itself.
    maildrop = await maildir_store.open_maildrop("alice", MailboxView(folder="inbox"))
    assert len(maildrop.messages) == 1
    await maildrop.release()


async def test_a_symlink_planted_as_a_folder_is_not_followed(
    maildir_store: MaildirStore, tmp_path: Path
) -> None:
    await maildir_store.deliver("alice", b"x\n")
    elsewhere = tmp_path / "elsewhere"
    for sub in ("cur", "new", "tmp"):
        (elsewhere / sub).mkdir(parents=True)
    (maildir_store.maildir("alice") / ".Trash").symlink_to(elsewhere)
    assert await maildir_store.folders("alice") == ["INBOX"]
    with pytest.raises(NoSuchFolder):
        await maildir_store.open_maildrop("alice", MailboxView(folder="Trash"))
    with pytest.raises(PermanentStoreError):
        await maildir_store.deliver("alice", b"y\n", folder="Trash")
    # A commit that would move into it fails and moves nothing.
    maildrop = await maildir_store.open_maildrop("alice", MailboxView(policy=TRASHING))
    with pytest.raises(PermanentStoreError):
        await maildrop.commit_deletions([0])
    assert [os.listdir(elsewhere / sub) for sub in ("cur", "new", "tmp")] == [[], [], []]
    assert await stored_messages(maildir_store, "alice") == [b"x\n"]


async def test_upkeep_of_a_user_without_a_maildir_makes_nothing(
    maildir_store: MaildirStore, tmp_path: Path
) -> None:
    assert await maildir_store.folders("nobody") == ["INBOX"]
    assert await maildir_store.devices("nobody") == []
    assert await maildir_store.forget_device("nobody", "phone") == 0
    assert (await maildir_store.sweep("nobody", TRASHING)).removed == 0
    assert (await maildir_store.usage("nobody")).messages == 0
    assert not (tmp_path / "mail" / "nobody").exists()


def chown_tree(path: Path) -> None:
    """Hand popbox's files to the mail user, as a popbox running as that user leaves them."""
    for directory, _, files in os.walk(path):
        os.chown(directory, MAIL_UID, MAIL_GID)
        for name in files:
            os.chown(Path(directory) / name, MAIL_UID, MAIL_GID)


async def test_dovecot_reads_popbox_folders_and_popbox_reads_dovecots(
    dovecot: DovecotServer,
) -> None:
    """doveadm lists and fetches the Trash popbox made, and popbox lists and reads a
    folder doveadm made and saved into."""
    root = dovecot.maildir("alice").parent
    store = MaildirStore(root)
    await store.deliver("alice", b"Subject: to trash\n\ngone\n")
    maildrop = await store.open_maildrop("alice", MailboxView(policy=TRASHING))
    await maildrop.commit_deletions([0])
    chown_tree(root / "alice")
    doveadm = ["doveadm", "-c", str(dovecot.config_path)]
    listed = subprocess.run(
        [*doveadm, "mailbox", "list", "-u", "alice"], capture_output=True, text=True, timeout=60
    )
    if listed.returncode != 0:
        pytest.skip(f"doveadm cannot run here: {listed.stderr.strip()}")
    assert "Trash" in listed.stdout.split()
    fetched = subprocess.run(
        [*doveadm, "fetch", "-u", "alice", "text", "mailbox", "Trash", "all"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert b"Subject: to trash" in fetched.stdout
    subprocess.run(
        [*doveadm, "mailbox", "create", "-u", "alice", "lists.python"], check=True, timeout=60
    )
    subprocess.run(
        [*doveadm, "save", "-u", "alice", "-m", "lists.python"],
        input=b"Subject: from dovecot\n\nsaved by doveadm\n",
        check=True,
        timeout=60,
    )
    assert await store.folders("alice") == ["INBOX", "Trash", "lists.python"]
    saved = await store.open_maildrop("alice", MailboxView(folder="lists.python"))
    assert b"saved by doveadm" in await read_all(saved, 0)
    await saved.release()


async def test_a_move_into_a_folder_a_session_holds_is_seen_after_its_quit(
    maildir_store: MaildirStore,
) -> None:
    """A session reading Trash commits while a QUIT in INBOX moves mail into Trash's
    cur/: the Trash index it writes must not claim cur/ unchanged, or the moved
    message would stay out of every later snapshot."""
    await maildir_store.deliver(
        "alice", b"Subject: first\n\nalready in the trash\n", folder="Trash"
    )
    await maildir_store.deliver("alice", b"Subject: second\n\nmoved meanwhile\n")
    trash_session = await maildir_store.open_maildrop("alice", MailboxView(folder="Trash"))
    inbox_session = await maildir_store.open_maildrop("alice", MailboxView(policy=TRASHING))
    await inbox_session.commit_deletions([0])
    await trash_session.commit_deletions([0])
    trash = await maildir_store.open_maildrop("alice", MailboxView(folder="Trash"))
    assert [await read_all(trash, 0)] == [b"Subject: second\n\nmoved meanwhile\n"]
    await trash.release()
