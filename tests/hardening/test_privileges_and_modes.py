"""Privilege drop and file modes: the attacks are a compromised server process running
as root, a config or passwd file rewritten by another local user, and mail read by
other local users."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popbox.config import load_config
from popbox.errors import ConfigError
from popbox.store.maildir import MaildirStore
from support.ports import free_port
from support.serverproc import PASSWORD, ClosingPOP3, deliver_lmtp, make_server, running

RUN_AS = "nobody"
RUN_AS_GROUP = "nogroup"


def _port_or_free(port: int) -> int:
    """The privileged port if nothing else holds it, else any free one."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def _ids(text: str) -> list[int]:
    return [int(part) for part in text.split()]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as root and drop")
def test_root_started_server_runs_as_the_configured_user_after_binding(
    shared_tmp: Path,
) -> None:
    """A server exploited after start must not hold root; mail must still work."""
    uid = pwd.getpwnam(RUN_AS).pw_uid
    gid = grp.getgrnam(RUN_AS_GROUP).gr_gid
    port = _port_or_free(110)
    server = make_server(
        shared_tmp / "data",
        extra=f'user = "{RUN_AS}"\ngroup = "{RUN_AS_GROUP}"\n[archive]\nkeep = ["delivered"]\n',
        pop3_port=port,
    )
    # As `popbox user add` run by root leaves it: root's, private.
    passwd = server.directory / "passwd"
    assert passwd.stat().st_uid == 0
    with running(server):
        # The kernel queues connections once the sockets are bound (before the drop);
        # the server starts taking them only later.
        for _ in range(300):
            log = server.log_text()
            if "POP3 listening" in log:
                break
            time.sleep(0.05)
        assert _ids(server.status("Uid")) == [uid] * 4
        assert _ids(server.status("Gid")) == [gid] * 4
        assert server.status("Groups").strip() == ""
        # Dropped before any listener is served, so before any client byte is read.
        assert log.index("dropped privileges") < log.index("POP3 listening")

        message = b"Subject: private\r\n\r\nfor alice only\r\n"
        assert deliver_lmtp(server.lmtp_port, "alice", message) == 250
        client = ClosingPOP3("127.0.0.1", port, timeout=10)
        # The TLS key was loaded as root before the drop: STLS works though the key
        # file stays root's alone.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.stls(context)
        client.user("alice")
        client.pass_(PASSWORD)
        _, lines, _ = client.retr(1)
        assert b"for alice only" in b"\r\n".join(lines)
        client.dele(1)
        client.quit()  # the commit runs as the server's user too
        again = server.pop3("alice")
        assert again.stat() == (0, 0)
        again.quit()
        # The archive kept the delivery, written as the server's user.
        archive = server.directory / "archive"
        assert (archive / "index.sqlite").stat().st_uid == uid
        assert stat.S_IMODE(archive.stat().st_mode) & 0o077 == 0

        key = server.directory / "tls" / "key.pem"
        assert key.stat().st_uid == 0
        assert stat.S_IMODE(key.stat().st_mode) & 0o077 == 0
        # The user database is root's and read-only for the server: a compromised
        # server cannot add users or change passwords.
        info = passwd.stat()
        assert (info.st_uid, info.st_gid) == (0, gid)
        assert stat.S_IMODE(info.st_mode) == 0o640
        # Mail belongs to the server's user and nobody else can read it.
        maildir = server.maildir_root / "alice"
        for path in [maildir, *maildir.rglob("*")]:
            info = path.lstat()
            assert info.st_uid == uid, path
            if path.is_dir():
                assert stat.S_IMODE(info.st_mode) == 0o700, path
            else:
                assert stat.S_IMODE(info.st_mode) & 0o077 == 0, path


def test_config_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "popbox.toml"
    config.write_text('hostname = "mail.example.org"\n')
    for mode in (0o620, 0o602, 0o666):
        config.chmod(mode)
        with pytest.raises(ConfigError, match="writable by group or others"):
            load_config(config)
    config.chmod(0o644)
    assert load_config(config).hostname == "mail.example.org"


def test_server_refuses_to_start_with_a_world_writable_config(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    server.config.chmod(0o666)
    result = subprocess.run(
        [sys.executable, "-m", "popbox", "serve", "--config", str(server.config)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert b"chmod go-w" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_config_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "popbox.toml"
    config.write_text("")
    os.chown(config, pwd.getpwnam(RUN_AS).pw_uid, -1)
    with pytest.raises(ConfigError, match="owned by uid"):
        load_config(config)


def test_mail_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Other local users must not read mail, even when popbox runs with umask 000."""

    async def deliver() -> None:
        store = MaildirStore(tmp_path / "mail")
        try:
            await store.deliver("alice", b"Subject: x\n\nsecret\n")
            drop = await store.open_maildrop("alice")  # writes the index
            await drop.release()
        finally:
            await store.close()

    old = os.umask(0)
    try:
        asyncio.run(deliver())
    finally:
        os.umask(old)
    maildir = tmp_path / "mail" / "alice"
    paths = [maildir, *maildir.rglob("*")]
    assert any(p.is_file() for p in paths)
    for path in paths:
        mode = stat.S_IMODE(path.lstat().st_mode)
        # Directories 0700, files 0600: nothing for group or others.
        assert mode & 0o077 == 0, f"{path} has mode {mode:04o}"
