"""The archive as `popbox serve` keeps it: deliveries over LMTP, what the archive
disposition removes from a mailbox, and what `popbox fetch` sends to an archive sink,
each found again with `popbox archive search` and stored once."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import httpx

from support.fetch import account_entry, write_fetch_config
from support.ports import free_port
from support.serverproc import PASSWORD, POPBOX, make_server, running, wait_listening


def _popbox(config: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*POPBOX, *args, "--config", str(config)],
        capture_output=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


def _search(config: Path, user: str, query: str) -> list[dict[str, Any]]:
    document = json.loads(_popbox(config, "archive", "search", user, query, "--json"))
    hits: list[dict[str, Any]] = document["hits"] if isinstance(document, dict) else document
    return hits


def _stored_messages(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "archive" / "index.sqlite") as db:
        (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
    return int(count)


def test_one_lmtp_delivery_to_five_users_is_archived_once_and_found_by_each(
    tmp_path: Path,
) -> None:
    users = ("ann", "ben", "cat", "dan", "eve", "zed")
    server = make_server(
        tmp_path / "server", users, extra='[archive]\nkeep = ["delivered"]\n'
    )
    message = (
        b"From: Ops <ops@example.net>\r\nTo: team@example.test\r\n"
        b"Subject: rollout window\r\nMessage-ID: <rollout@example.net>\r\n\r\n"
        b"The rollout window opens on Thursday.\r\n"
    )
    with running(server):
        with smtplib.LMTP("127.0.0.1", server.lmtp_port, timeout=30) as client:
            client.ehlo("archive.test")
            client.mail("ops@example.net")
            for user in users[:5]:
                client.rcpt(f"{user}@example.test")
            code, _ = client.data(message)
            # LMTP answers DATA once per recipient (RFC 2033); smtplib reads the first.
            codes = [code] + [client.getreply()[0] for _ in users[1:5]]
            assert codes == [250] * 5
        for user in users[:5]:
            hits = _search(server.config, user, '"rollout window" from:ops')
            assert len(hits) == 1, (user, hits)
        # zed got nothing: another user's archive is not searchable from his.
        assert _search(server.config, "zed", "rollout") == []
        # Five entries, one stored message.
        assert _stored_messages(server.directory) == 1
        usage = json.loads(_popbox(server.config, "archive", "usage", "--json"))
        rows = usage["users"] if isinstance(usage, dict) else usage
        assert sorted(row["user"] for row in rows) == sorted(users[:5])


def test_what_the_archive_disposition_removes_is_archived_once(tmp_path: Path) -> None:
    server = make_server(
        tmp_path / "server",
        ("alice",),
        extra='[archive]\nkeep = ["disposition"]\n[mailbox]\ndisposition = "archive"\n',
    )
    with running(server):
        for number in range(3):
            body = b"Subject: receipt %d\r\n\r\nreceipt number %d\r\n" % (number, number)
            with smtplib.LMTP("127.0.0.1", server.lmtp_port, timeout=30) as client:
                client.sendmail("shop@example.net", ["alice@example.test"], body)
        # Delivered only: the archive keeps what the disposition removes, not deliveries.
        assert _search(server.config, "alice", "receipt") == []
        client = server.pop3("alice")
        client.dele(1)
        client.dele(2)
        client.quit()
        _popbox(server.config, "expire")
        hits = _search(server.config, "alice", "receipt")
        assert sorted(hit["subject"] for hit in hits) == ["receipt 0", "receipt 1"]
        # A second sweep reads nothing again and keeps nothing twice.
        _popbox(server.config, "expire")
        assert len(_search(server.config, "alice", "receipt")) == 2


def test_popbox_fetch_into_an_archive_sink_keeps_each_message_once(tmp_path: Path) -> None:
    """A helpdesk drains a POP3 mailbox into its archive; a second run, as after a
    crash before the collector recorded anything, stores nothing twice."""
    source = make_server(tmp_path / "source", ("support",))
    archive_server = make_server(tmp_path / "archive", ("helpdesk",))
    with running(source):
        for number in range(4):
            body = b"Subject: ticket %d\r\n\r\nprinter jam on floor %d\r\n" % (number, number)
            with smtplib.LMTP("127.0.0.1", source.lmtp_port, timeout=30) as client:
                client.sendmail("user@example.net", ["support@example.test"], body)
        account = account_entry(
            source.pop3_port,
            tmp_path / "unused",
            name="support",
            username="support",
            security="none",
            allow_plaintext_password=True,
            sinks=[{"kind": "archive", "user": "helpdesk", "config": str(archive_server.config)}],
        )
        account["password_env"] = "POPBOX_TEST_PASSWORD"
        fetch_config = write_fetch_config(
            tmp_path / "fetch.toml", account, state_dir=str(tmp_path / "state")
        )
        fetch_config.chmod(0o600)
        env = dict(os.environ, POPBOX_TEST_PASSWORD=PASSWORD)
        _popbox(fetch_config, "fetch", env=env)
        hits = _search(archive_server.config, "helpdesk", "printer jam")
        assert sorted(hit["subject"] for hit in hits) == [f"ticket {n}" for n in range(4)]
        # Forget what the collector recorded: everything is fetched again and recognised.
        for state in (tmp_path / "state").iterdir():
            if state.is_file():
                state.unlink()
        _popbox(fetch_config, "fetch", env=env)
        assert len(_search(archive_server.config, "helpdesk", "printer jam")) == 4


def test_popbox_web_serves_the_page_on_its_own_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    server = make_server(
        tmp_path / "server", ("alice",), extra=f'[web]\nlisten = "127.0.0.1:{port}"\n'
    )
    process = subprocess.Popen(
        [*POPBOX, "web", "--config", str(server.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(port, process)
        page = httpx.get(f"http://127.0.0.1:{port}/login", timeout=30)
        assert page.status_code == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        refused = httpx.post(
            f"http://127.0.0.1:{port}/login",
            data={"username": "alice", "password": "wrong"},
            timeout=30,
        )
        assert refused.status_code in (401, 403)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode(errors="replace")
