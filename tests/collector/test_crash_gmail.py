"""Crash injection into the Gmail sink: `popbox fetch` is SIGKILLed at random moments
while it moves a real Dovecot mailbox into the local Gmail API (run in this process,
reached over verified HTTPS); clean runs afterwards must leave every message in the
mailbox exactly once, byte for byte but for the added X-Popbox-Id line.

A kill between the import and the state commit is the case that matters: the next run
offers the message again (attempt > 1), and the sink must find it instead of importing
it twice. Kills also land mid-upload (a resumable upload of a big message, a multipart
body), which must leave nothing behind.
"""

from __future__ import annotations

import os
import random
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.dovecot import DovecotServer
from support.fetch import (
    account_entry,
    crash_body,
    fetch_toml,
    kill_rounds,
    message,
    run_fetch,
    tls_fields,
)
from support.gmailapi import GmailApi, gmail_sink_toml, serve_gmail

pytestmark = pytest.mark.interop

ROUNDS = 15
MESSAGES = 30
# Above the simple-upload limit (5 MB): this one goes through the resumable protocol.
BIG_INDEX = 7
_POPBOX_ID = re.compile(rb"X-Popbox-Id: [0-9a-f]{32}\r\n")


@pytest.fixture
def gmail(server_context: ssl.SSLContext) -> Iterator[GmailApi]:
    yield from serve_gmail(GmailApi(), server_context)


def _body(index: int) -> bytes:
    if index == BIG_INDEX:
        return message(index, (b"b" * 998 + b"\n") * 5400)
    return crash_body(index)


def _imported(gmail: GmailApi) -> list[bytes]:
    """What the mailbox holds, as the bodies Dovecot had (the X-Popbox-Id line off)."""
    bodies = []
    for raw in gmail.raw_messages():
        found = _POPBOX_ID.match(raw)
        assert found is not None, raw[:200]
        bodies.append(raw[found.end() :].replace(b"\r\n", b"\n"))
    return sorted(bodies)


@pytest.mark.parametrize("delete", ["after_delivery", "keep"])
def test_sigkill_during_gmail_imports_loses_and_doubles_nothing(
    dovecot: DovecotServer, gmail: GmailApi, tls_files: Any, tmp_path: Path, delete: str
) -> None:
    rng = random.Random(int(os.environ.get("POPBOX_CRASH_SEED", "4")))
    expected = []
    for index in range(MESSAGES):
        expected.append(_body(index))
        dovecot.add_message("alice", _body(index))
    entry = account_entry(
        dovecot.pop3s_port,
        tmp_path / "unused",
        **tls_fields(tls_files.ca),
        delete=delete,
        max_messages_per_run=6,
        max_in_flight=4,
    )
    del entry["sinks"]
    config = tmp_path / "popbox.toml"
    config.write_text(
        fetch_toml(entry, state_dir=str(tmp_path / "state"))
        + gmail_sink_toml(gmail, tls_files.ca, labels=["INBOX", "Fetched"])
    )

    def arrivals() -> None:
        for index in range(MESSAGES, MESSAGES + 5):
            expected.append(message(index))
            dovecot.add_message("alice", message(index))

    killed = kill_rounds(config, rng, ROUNDS, arrivals)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        output: list[bytes] = []
        status = run_fetch(config, None, output)
        assert status == 0, output[-1].decode(errors="replace")[-2000:]
        if delete == "keep" and b" delivered account=" not in output[-1]:
            break  # nothing left to deliver
        if delete != "keep" and not dovecot.stored_messages("alice"):
            break
    lookups = gmail.calls("GET", "/messages")
    print(f"crash rounds={ROUNDS} killed={killed} imported={len(gmail.messages)} {lookups=}")
    assert killed >= ROUNDS // 3, "the kills should mostly land while the collector runs"
    assert _imported(gmail) == sorted(expected)
    assert all(gmail.label_names(m) == ["INBOX", "Fetched"] for m in gmail.messages.values())
    remaining = dovecot.stored_messages("alice")
    assert len(remaining) == (0 if delete == "after_delivery" else len(expected))
