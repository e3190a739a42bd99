"""Taking over a mailbox from Dovecot or Courier: clients download nothing again.

mpop and fetchmail leave mail on the old server (a private Dovecot) and keep their
UIDL state files, as a phone and a desktop would. popbox imports the mailbox (the
Dovecot files in place, or live over POP3 from the running Dovecot, or a Courier
Maildir with its courierpop3dsizelist); the same clients with the same state files,
pointed at popbox, then download zero messages, and exactly one after a new delivery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.dovecot import MAIL_GID, MAIL_UID, DovecotServer
from support.mailclients import FetchmailDevice, MpopDevice
from support.serverproc import POPBOX, ServerProcess, deliver_lmtp, make_server

pytestmark = pytest.mark.interop

PASSWORD = "secret"  # both Dovecot's and popbox's test password
Devices = tuple[MpopDevice, FetchmailDevice]
HOST = "127.0.0.1"  # clients key their state by user and host: the same for both servers


def message(number: int, size: int = 0) -> bytes:
    padding = b"".join(b"line %d of the body\r\n" % n for n in range(size))
    return (
        f"Message-ID: <m{number}@takeover.test>\r\nSubject: {number}\r\n\r\n{number}\r\n".encode()
        + padding
    )


def popbox_import(server: ServerProcess, *args: str) -> str:
    result = subprocess.run(
        [*POPBOX, "import", *args, "--config", str(server.config)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    return output


@pytest.fixture
def clients(tmp_path: Path, tls_files: object) -> Devices:
    ca = tls_files.ca  # type: ignore[attr-defined]
    (tmp_path / "mpop").mkdir()
    (tmp_path / "fetchmail").mkdir()
    return (
        MpopDevice(tmp_path / "mpop", "alice", PASSWORD, ca=ca),
        FetchmailDevice(tmp_path / "fetchmail", "alice", PASSWORD, ca=ca),
    )


def download_from_dovecot(dovecot: DovecotServer, clients: Devices) -> None:
    for client in clients:
        client.run(dovecot.pop3s_port, tls=True)
        assert client.numbers() == [1, 2, 3]


def check_after_switch(server: ServerProcess, clients: Devices) -> None:
    """Zero messages from popbox, then exactly the one delivered to it."""
    for client in clients:
        client.run(server.pop3_port, tls=False)
        assert client.numbers() == [1, 2, 3]
    assert deliver_lmtp(server.lmtp_port, "alice", message(4)) == 250
    for client in clients:
        client.run(server.pop3_port, tls=False)
        assert client.numbers() == [1, 2, 3, 4]


def live_import_args(dovecot: DovecotServer, server: ServerProcess, tls_files: object) -> list[str]:
    """``popbox import pop3`` from alice's mailbox on the running Dovecot into alice's."""
    password = server.directory / "old-password"
    password.write_text(PASSWORD + "\n")
    return [
        "pop3",
        "--host",
        HOST,
        "--port",
        str(dovecot.pop3s_port),
        "--tls",
        "implicit",
        "--ca-file",
        str(tls_files.ca),  # type: ignore[attr-defined]
        "--user",
        "alice",
        "--password-file",
        str(password),
        "--to",
        "alice",
    ]


@pytest.fixture
def popbox_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = make_server(tmp_path / "popbox", ("alice",))
    try:
        yield server
    finally:
        server.kill()


def test_dovecot_maildir_in_place(dovecot: DovecotServer, clients: Devices, tmp_path: Path) -> None:
    for number in (1, 2, 3):
        dovecot.add_message("alice", message(number))
    download_from_dovecot(dovecot, clients)
    dovecot.stop()  # the switch: Dovecot's mail root becomes popbox's
    server = make_server(
        tmp_path / "popbox",
        ("alice",),
        extra=f'[storage]\nmaildir_root = "{dovecot.root / "mail"}"\n',
    )
    try:
        report = popbox_import(server, "dovecot", "--user", "alice")
        assert "3 kept" in report, report
        again = popbox_import(server, "dovecot", "--user", "alice")  # idempotent
        assert "3 kept" in again, again
        server.start()
        check_after_switch(server, clients)
    finally:
        server.kill()


def test_dovecot_live_over_pop3(
    dovecot: DovecotServer,
    clients: Devices,
    popbox_server: ServerProcess,
    tls_files: object,
) -> None:
    for number in (1, 2, 3):
        dovecot.add_message("alice", message(number))
    download_from_dovecot(dovecot, clients)
    live = live_import_args(dovecot, popbox_server, tls_files)
    report = popbox_import(popbox_server, *live)
    assert "this run stored 3" in report, report
    again = popbox_import(popbox_server, *live)
    assert "this run stored 0, 3 were already there" in again, again
    assert len(dovecot.stored_messages("alice")) == 3  # nothing deleted on the old server
    popbox_server.start()
    check_after_switch(popbox_server, clients)


def courier_maildir(root: Path, uidvalidity: int) -> list[tuple[str, str]]:
    """A Courier-style Maildir with courierpop3dsizelist; (file name, Courier UIDL)."""
    names = []
    for number in (1, 2, 3):
        name = f"{1700000000 + number}.M{number}P99.courier.test,S={len(message(number))}:2,S"
        (root / "cur" / name).write_bytes(message(number))
        names.append(name)
    lines = [f"/3 4 {uidvalidity}\n"] + [
        f"{name} {len(message(n)) + 3} {n}:{uidvalidity}:0\n" for n, name in enumerate(names, 1)
    ]
    (root / "courierpop3dsizelist").write_text("".join(lines))
    return [(name, f"UID{n}-{uidvalidity}") for n, name in enumerate(names, 1)]


def test_courier_maildir_in_place(dovecot: DovecotServer, clients: Devices, tmp_path: Path) -> None:
    box = dovecot.maildir("alice")
    served = courier_maildir(box, uidvalidity=1234567)
    # Dovecot stands in for Courier's pop3d: P fields make it serve Courier's UIDLs, so
    # the clients' state files hold exactly what Courier would have shown them.
    (box / "dovecot-uidlist").write_text(
        "3 V99 N4\n"
        + "".join(
            f"{n} P{uidl} :{name.partition(':')[0]}\n" for n, (name, uidl) in enumerate(served, 1)
        )
    )
    for path in [box / "dovecot-uidlist", *(box / "cur").iterdir()]:
        os.chown(path, MAIL_UID, MAIL_GID)
    download_from_dovecot(dovecot, clients)
    dovecot.stop()
    for leftover in box.glob("dovecot*"):
        leftover.unlink()  # popbox reads Courier's list alone
    server = make_server(
        tmp_path / "popbox",
        ("alice",),
        extra=f'[storage]\nmaildir_root = "{dovecot.root / "mail"}"\n',
    )
    try:
        report = popbox_import(server, "courier", "--user", "alice")
        assert "3 kept" in report, report
        server.start()
        check_after_switch(server, clients)
    finally:
        server.kill()


def test_killed_live_import_resumes_without_duplicates(
    dovecot: DovecotServer, popbox_server: ServerProcess, tls_files: object
) -> None:
    total = 40
    for number in range(1, total + 1):
        dovecot.add_message("alice", message(number, size=2000))
    live = live_import_args(dovecot, popbox_server, tls_files)
    command = [*POPBOX, "import", *live, "--config", str(popbox_server.config)]
    inbox = popbox_server.maildir_root / "alice"
    kills = 0
    for _ in range(5):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stored_before = _stored(inbox)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if _stored(inbox) > stored_before:
                os.kill(process.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.001)
        process.wait(60)
        if _stored(inbox) >= total:
            break
    final = popbox_import(popbox_server, *live)
    assert f"{total} kept" in final, final
    popbox_server.start()
    client = popbox_server.pop3("alice")
    try:
        listing = [line.split()[1].decode() for line in client.uidl()[1]]
        count = client.stat()[0]
    finally:
        client.quit()
    assert count == total
    old = _dovecot_uidls(dovecot)
    assert listing == old  # every message once, with its old UIDL, in the old order
    assert kills >= 1


def _stored(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur") if (maildir / sub).exists())


def _dovecot_uidls(dovecot: DovecotServer) -> list[str]:
    import poplib
    import ssl

    context = ssl.create_default_context(cafile=str(dovecot.root / "cert.pem"))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = poplib.POP3_SSL(HOST, dovecot.pop3s_port, context=context, timeout=30)
    try:
        client.user("alice")
        client.pass_(PASSWORD)
        return [line.split()[1].decode() for line in client.uidl()[1]]
    finally:
        client.quit()
