"""The backup and POP3 sessions take turns on a user's folders, against a real `popbox
serve`: a session holding a folder is waited for and its QUIT is in the snapshot
whole; while the backup waits for one folder it holds the user's others, so no commit
can move a message between two folders the snapshot has already read and not yet."""

from __future__ import annotations

import poplib
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from popbox.backup import complete_snapshots
from support.serverproc import POPBOX, ServerProcess, deliver_lmtp, running

from .live import PASSWORD, Seen, delete, make_config, message, popbox, see


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = make_config(tmp_path / "live", ("alice", "bob"))
    with running(server):
        for number in range(6):
            assert deliver_lmtp(server.lmtp_port, "bob", message(f"b{number}")) == 250
        assert deliver_lmtp(server.lmtp_port, "alice", message("a0")) == 250
        delete(server, "bob", (6,))  # bob's Trash holds b5
        see(server, "bob+Trash")  # and has its UIDLs (a folder gets them at its first login)
        yield server


@contextmanager
def backup_waiting_for(server: ServerProcess, dest: Path, folder: str) -> Iterator[None]:
    """A `popbox backup` started and seen waiting for bob's ``folder``; on leaving,
    it is waited for and must have succeeded."""
    process = subprocess.Popen(
        [*POPBOX, "backup", str(dest), "--config", str(server.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:
            if f"waiting for a session of bob to end (folder {folder})".encode() in line:
                break
        else:
            raise AssertionError("the backup never waited for the session")
        yield
    except BaseException:
        process.kill()  # it may wait for a session that will never end now
        raise
    finally:
        rest = process.stderr.read()
        process.stderr.close()
        process.wait(120)
    assert process.returncode == 0, rest


def login(server: ServerProcess, name: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
    try:
        client.user(name)
        client.pass_(PASSWORD)
    except BaseException:
        client.close()
        raise
    return client


def restored_views(tmp_path: Path, dest: Path) -> tuple[Seen, Seen]:
    restored = make_config(tmp_path / "restored", passwd=False)
    popbox(restored.config, "restore", str(dest))
    with running(restored):
        return see(restored, "bob"), see(restored, "bob+Trash")


def test_a_session_that_quits_while_the_backup_waits_is_in_the_snapshot_whole(
    server: ServerProcess, tmp_path: Path
) -> None:
    dest = tmp_path / "backups"
    client = login(server, "bob")
    try:
        client.dele(1)
        client.dele(2)
        with backup_waiting_for(server, dest, "INBOX"):
            client.quit()  # b0 and b1 go to Trash while the backup waits
    finally:
        client.close()
    expected = see(server, "bob"), see(server, "bob+Trash")
    assert expected[0].subjects == ["b2", "b3", "b4"]
    assert expected[1].subjects == ["b5", "b0", "b1"]
    assert restored_views(tmp_path, dest) == expected
    assert len(complete_snapshots(dest)) == 1


def test_the_backup_holds_a_users_folders_together_while_it_waits_for_one(
    server: ServerProcess, tmp_path: Path
) -> None:
    dest = tmp_path / "backups"
    trash = login(server, "bob+Trash")
    try:
        with backup_waiting_for(server, dest, "Trash"):
            # INBOX is the backup's until it has Trash too: a session could otherwise
            # move a message into Trash after INBOX was read and before Trash is.
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                login(server, "bob")
            see(server, "alice")  # other users are not held up
            trash.quit()
    finally:
        trash.close()
    expected = see(server, "bob"), see(server, "bob+Trash")
    assert restored_views(tmp_path, dest) == expected
