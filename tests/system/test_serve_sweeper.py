"""`popbox serve`'s mailbox sweeper: exactly one process sweeps (with several workers,
the worker in slot 0 and whoever replaces it), it sweeps on its own, and the server
still stops cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.ports import free_port
from support.serverproc import PASSWORD, POPBOX, ClosingPOP3, deliver_lmtp, wait_listening

# How long a condition may take to show in the log (a start, a restart, a sweep).
WAIT: float = 30.0


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    log: Path
    pop3: int
    lmtp: int

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the log, once there are that many."""
        deadline = time.monotonic() + WAIT
        while True:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no {count} x {pattern!r} in the log:\n{self.text()}")
            time.sleep(0.05)


def _serve(directory: Path, *, workers: int, users: str, mailbox: str) -> Iterator[Serve]:
    pop3, lmtp = free_port(), free_port()
    passwd = directory / "passwd"
    passwd.write_text(users)
    passwd.chmod(0o600)
    config = directory / "popbox.toml"
    config.write_text(
        f'data_dir = "{directory}"\n'
        f'[pop3]\nlisten = ["127.0.0.1:{pop3}"]\ntls_listen = []\nworkers = {workers}\n'
        f'plaintext_auth = "always"\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{lmtp}"]\ndomains = ["example.test"]\n'
        f"[limits]\nauth_failure_delay = 0\nshutdown_grace = 1\n"
        f"[mailbox]\n{mailbox}"
    )
    config.chmod(0o600)
    log = directory / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*POPBOX, "serve", "--config", str(config)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_listening(pop3, process)
        yield Serve(process, log, pop3, lmtp)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Serve]:
    # No users: the sweeps have nothing to do, so only the workers' roles show.
    yield from _serve(tmp_path, workers=2, users="", mailbox="sweep_interval = 0.2\n")


def test_one_worker_sweeps_and_its_replacement_takes_over(two_workers: Serve) -> None:
    serve = two_workers
    started = serve.wait_for(r"worker (\d+) started in slot (\d)", count=2)
    slots = {int(match.group(2)): int(match.group(1)) for match in started}
    assert sorted(slots) == [0, 1]
    sweeper = serve.wait_for(r"worker (\d+) sweeps every mailbox")[0]
    assert int(sweeper.group(1)) == slots[0]
    serve.wait_for(r"swept 0 users", count=2)

    os.kill(slots[0], signal.SIGKILL)
    restarted = serve.wait_for(r"worker (\d+) started in slot (\d)", count=3)[2]
    assert restarted.group(2) == "0"
    sweepers = serve.wait_for(r"worker (\d+) sweeps every mailbox", count=2)
    assert int(sweepers[1].group(1)) == int(restarted.group(1))

    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(60) == 0
    text = serve.text()
    assert len(re.findall(r"sweeps every mailbox", text)) == 2
    assert "Traceback" not in text


def test_the_server_empties_trash_on_its_own(tmp_path: Path) -> None:
    serve_it = _serve(
        tmp_path,
        workers=1,
        users=f"alice:{{PLAIN}}{PASSWORD}::::::\n",
        mailbox='disposition = "trash"\ntrash_days = 0\nsweep_interval = 0.2\n',
    )
    serve = next(serve_it)
    try:
        assert deliver_lmtp(serve.lmtp, "alice", b"Subject: hi\n\nhello\n") == 250
        client = ClosingPOP3("127.0.0.1", serve.pop3, timeout=10)
        client.user("alice")
        client.pass_(PASSWORD)
        client.dele(1)
        client.quit()
        # QUIT moved it to Trash; a sweep found Trash past its 0 days and removed it.
        serve.wait_for(r"sweep of alice: 1 removed, 0 moved, 0 hidden")
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(60) == 0
        assert "Traceback" not in serve.text()
    finally:
        serve_it.close()
