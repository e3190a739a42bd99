"""Crash injection into the IMAP sink: `popbox fetch` is SIGKILLed at random moments
while it bridges alice's POP3 mailbox into bob's IMAP folder on a real Dovecot; clean
runs afterwards must leave every message in the folder exactly once and intact (byte
for byte, but for the X-Popbox-Id line in header mode).

A kill between the server's APPEND answer and the collector's record is what the
sink's lookup before a repeated attempt is for; the kill -9 loop finds out whether it
works, with the messages kept on the POP3 server and with them deleted after delivery.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from support.dovecot import DovecotServer, imap_skip_reason, start_dovecot
from support.fetch import (
    account_entry,
    crash_body,
    kill_rounds,
    message,
    run_fetch,
    tls_fields,
    write_fetch_config,
)

pytestmark = pytest.mark.interop

ROUNDS = 15
MESSAGES = 30
BOB_PASSWORD_ENV = "POPBOX_TEST_CRASH_IMAP_PASSWORD"  # a variable name, read by the subprocess
FOLDER = "Bridged"


@pytest.fixture
def imap_dovecot(tls_files: Any, shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    reason = imap_skip_reason()
    if reason:
        pytest.skip(reason)
    server = start_dovecot(shared_tmp / "dovecot", tls_files.cert, tls_files.key)
    server.add_user("alice", "secret")
    server.add_user("bob", "bob-secret")
    monkeypatch.setenv(BOB_PASSWORD_ENV, "bob-secret")
    try:
        yield server
    finally:
        server.stop()


def _write_config(
    path: Path, dovecot: DovecotServer, tls_files: Any, delete: str, identify: str
) -> None:
    sink = {
        "kind": "imap",
        "host": "127.0.0.1",
        "port": dovecot.imaps_port,
        "ca_file": str(tls_files.ca),
        "tls_server_name": "localhost",
        "username": "bob",
        "password_env": BOB_PASSWORD_ENV,
        "folder": FOLDER,
        "identify": identify,
        "connections": 2,
    }
    account = account_entry(
        dovecot.pop3s_port,
        path.parent / "unused",
        **tls_fields(tls_files.ca),
        delete=delete,
        max_messages_per_run=6,
        max_in_flight=4,
        sinks=[sink],
    )
    write_fetch_config(path, account, state_dir=path.parent / "state")


def _originals(stored: list[bytes], identify: str) -> list[bytes]:
    """The messages as the POP3 server had them (header mode: without our line)."""
    if identify == "message_id":
        return sorted(stored)
    assert all(data.startswith(b"X-Popbox-Id: ") for data in stored)
    return sorted(data.split(b"\r\n", 1)[1] for data in stored)


@pytest.mark.parametrize(
    ("delete", "identify"),
    [("keep", "header"), ("after_delivery", "header"), ("after_delivery", "message_id")],
)
def test_sigkill_while_bridging_into_imap_loses_and_doubles_nothing(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path, delete: str, identify: str
) -> None:
    rng = random.Random(int(os.environ.get("POPBOX_CRASH_SEED", "4")))
    expected = []
    for index in range(MESSAGES):
        expected.append(crash_body(index).replace(b"\n", b"\r\n"))
        imap_dovecot.add_message("alice", crash_body(index))
    config = tmp_path / "popbox.toml"
    _write_config(config, imap_dovecot, tls_files, delete, identify)

    def arrivals() -> None:
        for index in range(MESSAGES, MESSAGES + 5):
            expected.append(message(index).replace(b"\n", b"\r\n"))
            imap_dovecot.add_message("alice", message(index))

    killed = kill_rounds(config, rng, ROUNDS, arrivals)
    # Clean runs until the folder holds as many messages as were sent (each run takes
    # at most max_messages_per_run), then one more that must find nothing left to do.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        output: list[bytes] = []
        status = run_fetch(config, None, output)
        assert status == 0, output[-1].decode(errors="replace")[-1000:] + imap_dovecot.log()[-3000:]
        if len(imap_dovecot.folder_messages("bob", FOLDER)) >= len(expected):
            break
    assert run_fetch(config, None) == 0
    print(f"crash rounds={ROUNDS} killed={killed}")
    assert killed >= ROUNDS // 3, "the kills should mostly land while the collector runs"
    stored = imap_dovecot.folder_messages("bob", FOLDER)
    assert _originals(stored, identify) == sorted(expected)
    if delete == "after_delivery":
        assert imap_dovecot.stored_messages("alice") == []
    else:
        assert len(imap_dovecot.stored_messages("alice")) == len(expected)
