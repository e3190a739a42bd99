"""Quarantine retries, several sinks per account, retry budgets and the daemon's stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from support.dovecot import DovecotServer
from support.fakepop import FakePop
from support.fetch import (
    account_entry,
    crlf_message,
    maildir_messages,
    message,
    poll,
    settings_for,
    tls_fields,
    write_fetch_config,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakePop]:
    server = await FakePop([crlf_message(i) for i in range(1, 4)]).start()
    yield server
    await server.stop()


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "sink.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


async def test_retry_quarantined_reoffers_after_the_fix(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = tmp_path / "fixed"
    command = script(
        tmp_path,
        f"body=$(cat)\ncase \"$body\" in *'fake 2'*) [ -e {fixed} ] || exit 1;; esac\n"
        f'echo "$POPBOX_UIDL" >> {tmp_path}/taken\n',
    )
    settings = settings_for(
        fake, tmp_path, monkeypatch, sinks=[{"kind": "command", "command": command}]
    )
    first = await poll(settings)
    assert (first.delivered, first.quarantined) == (2, 1)
    fixed.touch()
    assert (await poll(settings)).delivered == 0
    db_path = settings.state_db_path
    from popbox.collector.poll import Poller
    from popbox.collector.state import StateDB

    db = StateDB(db_path)
    try:
        retried = await Poller(settings.accounts[0], settings, db).run(retry_quarantined=True)
    finally:
        db.close()
    assert (retried.delivered, retried.quarantined) == (1, 0)
    assert sorted((tmp_path / "taken").read_text().split()) == ["uid-1", "uid-2", "uid-3"]
    assert list((settings.quarantine_path / "fake").glob("*.eml")) == []


async def test_a_failing_sink_does_not_duplicate_into_the_others(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy = tmp_path / "healthy"
    command = script(tmp_path, f"cat >/dev/null\n[ -e {healthy} ] || exit 75\n")
    sinks = [
        {"kind": "maildir", "path": str(tmp_path / "out")},
        {"kind": "command", "command": command},
    ]
    settings = settings_for(fake, tmp_path, monkeypatch, sinks=sinks, delete="after_delivery")
    first = await poll(settings)
    assert (first.delivered, first.failed) == (0, 3)
    assert fake.deleted == set()  # nothing is deleted before every sink confirmed
    healthy.touch()
    second = await poll(settings)
    assert second.delivered == 3
    assert len(maildir_messages(tmp_path / "out")) == 3
    assert fake.deleted == {1, 2, 3}


async def test_temporary_failures_past_the_budget_go_to_quarantine(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = script(tmp_path, "cat >/dev/null\nexit 75\n")
    settings = settings_for(
        fake, tmp_path, monkeypatch, sinks=[{"kind": "command", "command": command}], max_attempts=2
    )
    assert (await poll(settings)).failed == 3
    second = await poll(settings)
    assert (second.failed, second.quarantined) == (0, 3)
    assert second.pending == 0


async def test_per_run_limits(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(fake, tmp_path, monkeypatch, max_messages_per_run=2)
    first = await poll(settings)
    assert (first.delivered, first.pending) == (2, 1)
    assert (await poll(settings)).delivered == 1


async def test_oversize_skip_and_quarantine(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.messages.append(crlf_message(9) + b"x" * 5000 + b"\r\n")
    skip = await poll(settings_for(fake, tmp_path, monkeypatch, max_message_size=1000))
    assert (skip.delivered, skip.skipped) == (3, 1)
    assert not any(c == "RETR 4" for c in fake.commands)
    fake2 = tmp_path / "q"
    settings = settings_for(
        fake,
        fake2,
        monkeypatch,
        max_message_size=1000,
        oversize="quarantine",
    )
    quarantined = await poll(settings)
    assert (quarantined.delivered, quarantined.quarantined) == (3, 1)


def test_daemon_stops_cleanly_on_sigterm(
    dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    for index in range(40):
        dovecot.add_message("alice", message(index, b"z" * 20000 + b"\n"))
    config = tmp_path / "popbox.toml"
    account = account_entry(
        dovecot.pop3s_port, tmp_path / "out", **tls_fields(tls_files.ca), interval=3600
    )
    write_fetch_config(config, account, state_dir=tmp_path / "state")
    process = subprocess.Popen(
        [sys.executable, "-m", "popbox", "fetch", "--config", str(config), "--daemon"],
        env=dict(os.environ, POPBOX_TEST_PASSWORD="secret"),
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    # A daemon that never delivers would keep the loop below reading forever.
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    with process.stderr:
        for line in process.stderr:
            if b" delivered account=" in line:
                break
        watchdog.cancel()
        assert process.poll() is None, "the daemon ended before delivering anything"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        rest = process.stderr.read()
    # It finished the message in hand and QUIT: the log says how far it got.
    assert b"poll done account=alice" in rest
    delivered = len(maildir_messages(tmp_path / "out"))
    assert 1 <= delivered <= 40


async def test_two_collectors_never_poll_one_account_at_once(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from popbox.collector.poll import Poller
    from popbox.collector.state import StateDB

    settings = settings_for(fake, tmp_path, monkeypatch)
    first_db, second_db = StateDB(settings.state_db_path), StateDB(settings.state_db_path)
    try:
        first, second = await asyncio.gather(
            Poller(settings.accounts[0], settings, first_db).run(),
            Poller(settings.accounts[0], settings, second_db).run(),
        )
    finally:
        first_db.close()
        second_db.close()
    assert first.delivered + second.delivered == 3
    assert any("another collector" in note for note in first.notes + second.notes)
    assert len(maildir_messages(tmp_path / "out")) == 3


def test_cli_polls_several_accounts_and_selects_with_account(
    dovecot: DovecotServer, tls_files: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from popbox.collector.cli import fetch_command

    dovecot.add_user("bob", "secret")
    for index in range(3):
        dovecot.add_message("alice", message(index))
        dovecot.add_message("bob", message(10 + index))
    accounts = [
        account_entry(
            dovecot.pop3s_port,
            tmp_path / user,
            name=user,
            username=user,
            **tls_fields(tls_files.ca),
        )
        for user in ("alice", "bob")
    ]
    config = tmp_path / "popbox.toml"
    write_fetch_config(config, *accounts, state_dir=tmp_path / "state")
    monkeypatch.setenv("POPBOX_TEST_PASSWORD", "secret")
    runner = CliRunner()
    only_bob = runner.invoke(fetch_command, ["--config", str(config), "--account", "bob"])
    assert only_bob.exit_code == 0, only_bob.output
    assert len(maildir_messages(tmp_path / "bob")) == 3
    assert not (tmp_path / "alice").exists()
    both = runner.invoke(fetch_command, ["--config", str(config)])
    assert both.exit_code == 0, both.output
    assert len(maildir_messages(tmp_path / "alice")) == 3
    assert len(maildir_messages(tmp_path / "bob")) == 3
    status = runner.invoke(fetch_command, ["--config", str(config), "--status"])
    assert status.exit_code == 0
    assert "alice" in status.output
    assert "bob" in status.output
