"""`popbox fetch --daemon` re-reads its config on SIGHUP: a new account is polled, a
removed one stops, a changed one restarts, and a broken config is refused while the
daemon keeps polling with the one it has."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.dovecot import DovecotServer
from support.fetch import PASSWORD_ENV, account_entry, message, tls_fields, write_fetch_config

pytestmark = pytest.mark.interop

# Seconds a step may take before the test gives up (the daemon polls every second).
STEP_TIMEOUT = 60.0


class DaemonLog:
    """The daemon's standard error, line by line, as it comes."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()

    def finish(self, process: subprocess.Popen[bytes]) -> None:
        """After the daemon exited: read to the end, close the pipe."""
        self._reader.join(STEP_TIMEOUT)
        assert process.stderr is not None
        process.stderr.close()

    def count(self, text: str, since: int = 0) -> int:
        with self._changed:
            return sum(text in line for line in self.lines[since:])

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def wait_for(self, text: str, times: int = 1, since: int = 0) -> int:
        """Wait until ``text`` appeared ``times`` times after line ``since``; return
        the index after the last of them."""
        deadline = time.monotonic() + STEP_TIMEOUT
        with self._changed:
            while True:
                seen = [i for i, line in enumerate(self.lines) if i >= since and text in line]
                if len(seen) >= times:
                    return seen[times - 1] + 1
                left = deadline - time.monotonic()
                assert left > 0, f"no {text!r} x{times}:\n" + "\n".join(self.lines[-40:])
                self._changed.wait(left)


@pytest.fixture
def write_config(dovecot: DovecotServer, tls_files: Any, tmp_path: Path) -> Callable[..., Path]:
    config = tmp_path / "popbox.toml"

    def write(**intervals: float) -> Path:
        """Accounts (all alice's mailbox, each into its own Maildir) by name."""
        accounts = [
            account_entry(
                dovecot.pop3s_port,
                tmp_path / name,
                **tls_fields(tls_files.ca),
                name=name,
                interval=interval,
            )
            for name, interval in intervals.items()
        ]
        return write_fetch_config(config, *accounts, state_dir=tmp_path / "state")

    return write


@pytest.fixture
def daemon(
    write_config: Callable[..., Path],
) -> Iterator[tuple[subprocess.Popen[bytes], DaemonLog]]:
    config = write_config(first=0.5)
    process = subprocess.Popen(
        [sys.executable, "-m", "popbox", "fetch", "--config", str(config), "--daemon"],
        env=dict(os.environ, **{PASSWORD_ENV: "secret"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log = DaemonLog(process)
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        log.finish(process)


def test_sighup_adds_removes_changes_and_refuses_a_broken_config(
    dovecot: DovecotServer,
    tmp_path: Path,
    write_config: Callable[..., Path],
    daemon: tuple[subprocess.Popen[bytes], DaemonLog],
) -> None:
    process, log = daemon
    dovecot.add_message("alice", message(1))
    log.wait_for("poll done account=first")
    assert len(os.listdir(tmp_path / "first" / "new")) == 1

    # "first" goes, "second" comes.
    write_config(second=0.5)
    process.send_signal(signal.SIGHUP)
    reloaded = log.wait_for("config reloaded added=1 changed=0 removed=1 unchanged=0")
    log.wait_for("poll done account=second", times=3, since=reloaded)
    assert len(os.listdir(tmp_path / "second" / "new")) == 1
    # At most the poll that was in hand when the signal came.
    assert log.count("poll done account=first", since=reloaded) <= 1
    late = log.mark()
    log.wait_for("poll done account=second", times=2, since=late)
    assert log.count("poll done account=first", since=late) == 0

    # A broken config is refused, loudly, and the running one goes on.
    (tmp_path / "popbox.toml").write_text("[fetch]\nbogus = 1\n")
    process.send_signal(signal.SIGHUP)
    refused = log.wait_for("config reload refused")
    assert " ERROR " in log.lines[refused - 1]
    assert "fetch.bogus" in log.lines[refused - 1]
    log.wait_for("poll done account=second", times=2, since=refused)
    assert process.poll() is None

    # A changed account restarts with its new settings; its state carries over.
    dovecot.add_message("alice", message(2))
    write_config(second=0.7, third=0.5)
    process.send_signal(signal.SIGHUP)
    changed = log.wait_for("config reloaded added=1 changed=1 removed=0 unchanged=0")
    log.wait_for("delivered account=second", since=changed)
    log.wait_for("poll done account=second", times=2, since=changed)
    log.wait_for("poll done account=third", since=changed)
    assert len(os.listdir(tmp_path / "second" / "new")) == 2
    assert len(os.listdir(tmp_path / "third" / "new")) == 2

    # The same config again: nothing to swap, both go on.
    process.send_signal(signal.SIGHUP)
    same = log.wait_for("config reloaded added=0 changed=0 removed=0 unchanged=2")
    log.wait_for("poll done account=second", since=same)
    log.wait_for("poll done account=third", since=same)

    process.send_signal(signal.SIGTERM)
    assert process.wait(STEP_TIMEOUT) == 0
