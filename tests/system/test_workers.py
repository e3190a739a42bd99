"""`pop3.workers`: several processes share the listeners and the maildrop lock."""

from __future__ import annotations

import os
import poplib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.ports import free_port
from support.serverproc import POPBOX, wait_listening

USERS = ("ann", "ben", "cat", "dan")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def _login(port: int, user: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(user)
    client.pass_("pw")
    return client


Workers = tuple["subprocess.Popen[bytes]", int]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    port, lmtp = free_port(), free_port()
    config = tmp_path / "popbox.toml"
    config.write_text(
        f'[pop3]\nlisten = ["127.0.0.1:{port}"]\ntls_listen = []\nworkers = 2\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{lmtp}"]\n[limits]\nauth_failure_delay = 0\n'
    )
    for user in USERS:
        added = subprocess.run(
            [*POPBOX, "user", "add", user, "--password-stdin", "--config", str(config)],
            input=b"pw\n",
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert added.returncode == 0, added.stderr
        delivered = subprocess.run(
            [*POPBOX, "deliver", user, "--config", str(config)],
            input=b"Subject: hi\n\nhello\n",
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert delivered.returncode == 0, delivered.stderr
    process = subprocess.Popen(
        [*POPBOX, "serve", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def test_two_workers_serve_and_a_killed_one_is_replaced(workers: Workers) -> None:
    process, port = workers
    deadline = time.monotonic() + 30
    while len(_children(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    first = _children(process.pid)
    assert len(first) == 2

    # Sessions held open at once land on both workers; each sees its own maildrop.
    clients = [_login(port, user) for user in USERS]
    assert all(client.stat()[0] == 1 for client in clients)
    for client in clients:
        client.quit()

    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _children(process.pid)
        if len(now) == 2 and first[0] not in now:
            break
        time.sleep(0.1)
    assert len(_children(process.pid)) == 2
    assert first[0] not in _children(process.pid)
    for _ in range(6):
        client = _login(port, "ann")
        assert client.stat()[0] == 1
        client.quit()

    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


def test_the_maildrop_lock_holds_across_workers(workers: Workers) -> None:
    _, port = workers
    holder = _login(port, "ann")
    # With two workers some of these land on the other process: all must be refused.
    for _ in range(6):
        other = poplib.POP3("127.0.0.1", port, timeout=30)
        other.user("ann")
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            other.pass_("pw")
        other.close()
    holder.quit()
    after = _login(port, "ann")
    assert after.stat()[0] == 1
    after.quit()
