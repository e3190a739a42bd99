"""The mailbox model with real clients against a real `popbox serve` on Maildir.

Devices are mpop and fetchmail instances that log in as ``alice~NAME``; mail arrives
over LMTP; the sweeper is `popbox expire` with the time moved forward by ``--now``
rather than slept. Each client keeps its own UIDL file, as on a real phone or laptop.
"""

from __future__ import annotations

import poplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.interop import require
from support.mailclients import FetchmailDevice, MpopDevice
from support.serverproc import (
    PASSWORD,
    POPBOX,
    ClosingPOP3,
    ServerProcess,
    deliver_lmtp,
    make_server,
)

DAY = 86_400
MAILBOX = """
[mailbox]
disposition = "trash"
trash_days = 7
"""


def message(number: int) -> bytes:
    return f"Message-ID: <m{number}@popbox.test>\r\nSubject: {number}\r\n\r\n{number}\r\n".encode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = make_server(tmp_path / "server", ("alice", "bob", "carol"), extra=MAILBOX)
    passwd = process.directory / "passwd"
    passwd.write_text(
        passwd.read_text()
        + "support:{PLAIN}team-only::::::popbox_shared_with=bob\n"
    )
    process.start()
    try:
        yield process
    finally:
        process.kill()


def deliver(server: ServerProcess, *numbers: int, recipient: str = "alice") -> None:
    for number in numbers:
        assert deliver_lmtp(server.lmtp_port, recipient, message(number)) == 250


def device(
    server: ServerProcess, tmp_path: Path, name: str, *, keep: bool = True
) -> MpopDevice:
    workdir = tmp_path / f"device-{name}"
    workdir.mkdir()
    return MpopDevice(workdir, f"alice~{name}", PASSWORD, keep=keep)


def folder_files(server: ServerProcess, user: str, folder: str = "") -> list[Path]:
    maildir = server.maildir_root / user / (f".{folder}" if folder else "")
    return [path for sub in ("new", "cur") for path in (maildir / sub).glob("*")]


def expire(server: ServerProcess, now: float) -> str:
    result = subprocess.run(
        [*POPBOX, "expire", "--config", str(server.config), "--now", str(int(now))],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    return result.stdout.decode()


def login(server: ServerProcess, user: str, password: str = PASSWORD) -> poplib.POP3:
    client = ClosingPOP3("127.0.0.1", server.pop3_port, timeout=10)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


def test_two_devices_that_leave_mail_each_get_every_message_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    phone = device(server, tmp_path, "phone")
    laptop = device(server, tmp_path, "laptop")
    deliver(server, 1, 2, 3)
    phone.run(server.pop3_port)
    laptop.run(server.pop3_port)
    phone.run(server.pop3_port)  # nothing new: no second copy
    deliver(server, 4)
    laptop.run(server.pop3_port)
    phone.run(server.pop3_port)
    assert phone.numbers() == laptop.numbers() == [1, 2, 3, 4]
    assert len(folder_files(server, "alice")) == 4


def test_a_device_that_deletes_takes_nothing_from_the_others(
    server: ServerProcess, tmp_path: Path
) -> None:
    phone = device(server, tmp_path, "phone")
    laptop = device(server, tmp_path, "laptop")
    desk_dir = tmp_path / "device-desk"
    desk = FetchmailDevice(desk_dir, "alice~desk", PASSWORD, keep=False)
    phone.run(server.pop3_port)
    laptop.run(server.pop3_port)  # both known to the mailbox before the mail comes
    deliver(server, 1, 2)
    desk.run(server.pop3_port)
    desk.run(server.pop3_port)
    assert desk.numbers() == [1, 2]
    phone.run(server.pop3_port)
    laptop.run(server.pop3_port)
    assert phone.numbers() == laptop.numbers() == [1, 2]
    assert len(folder_files(server, "alice")) == 2


def test_when_every_active_device_deleted_it_goes_to_trash_then_leaves(
    server: ServerProcess, tmp_path: Path
) -> None:
    phone = device(server, tmp_path, "phone", keep=False)
    laptop = device(server, tmp_path, "laptop", keep=False)
    phone.run(server.pop3_port)
    laptop.run(server.pop3_port)
    deliver(server, 1)
    phone.run(server.pop3_port)
    assert len(folder_files(server, "alice")) == 1  # the laptop still wants it
    laptop.run(server.pop3_port)
    assert phone.numbers() == laptop.numbers() == [1]
    assert folder_files(server, "alice") == []
    assert len(folder_files(server, "alice", "Trash")) == 1
    now = time.time()
    expire(server, now + 6 * DAY)
    assert len(folder_files(server, "alice", "Trash")) == 1
    expire(server, now + 8 * DAY)
    assert folder_files(server, "alice", "Trash") == []


def test_recent_mode_reoffers_a_message_another_device_took(
    server: ServerProcess, tmp_path: Path
) -> None:
    desk = device(server, tmp_path, "desk", keep=False)
    login(server, "alice~laptop").quit()  # a device that holds the mail on the server
    deliver(server, 1)
    desk.run(server.pop3_port)
    assert desk.numbers() == [1]
    # The same UIDL as the desk saw, through curl's URL form of the login name.
    result = subprocess.run(
        [
            require("curl"),
            "--silent",
            "--show-error",
            "--max-time",
            "30",
            "--request",
            "UIDL",
            f"pop3://recent%3Aalice:{PASSWORD}@127.0.0.1:{server.pop3_port}/",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    listing = result.stdout.decode().split()
    assert len(listing) == 2
    assert listing[0] == "1"
    client = login(server, "alice~laptop")
    try:
        assert client.uidl()[1] == [b"1 " + listing[1].encode()]
    finally:
        client.quit()


def test_lmtp_to_a_detail_address_lands_in_the_folder_and_a_folder_login_reads_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    deliver(server, 7, recipient="alice+invoices")
    assert len(folder_files(server, "alice", "invoices")) == 1
    assert (server.maildir_root / "alice" / ".invoices" / "maildirfolder").exists()
    inbox = login(server, "alice")
    try:
        assert inbox.stat()[0] == 0
    finally:
        inbox.quit()
    reader = MpopDevice(tmp_path, "alice+invoices", PASSWORD)
    reader.run(server.pop3_port)
    assert reader.numbers() == [7]


def test_a_team_member_opens_the_shared_mailbox_with_their_own_password(
    server: ServerProcess,
) -> None:
    login(server, "support", "team-only").quit()  # the mailbox's own device
    deliver(server, 1, recipient="support")
    bob = login(server, "support*bob")
    try:
        assert bob.stat()[0] == 1
        bob.dele(1)
    finally:
        bob.quit()
    for user, password in (("support*bob", "wrong"), ("support*carol", PASSWORD)):
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            login(server, user, password)
    # bob's deletion was his alone: the mailbox's own login still has the message.
    owner = login(server, "support", "team-only")
    try:
        assert owner.stat()[0] == 1
    finally:
        owner.quit()
