"""Crash injection: the collector is SIGKILLed at random moments while it fetches from a
real Dovecot into a Maildir (an mbox, a popbox maildrop) with the delete policy on; a
final clean run must leave every message in the sink exactly once and the server
empty."""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest

from support.dovecot import DovecotServer
from support.fetch import (
    account_entry,
    crash_body,
    kill_rounds,
    maildir_messages,
    message,
    run_fetch,
    tls_fields,
    write_fetch_config,
)

pytestmark = pytest.mark.interop

ROUNDS = 15
MESSAGES = 30


def _write_config(
    path: Path, dovecot: DovecotServer, tls_files: Any, out: Path, kind: str = "maildir"
) -> None:
    sink: dict[str, str] = {"kind": kind, "path": str(out)}
    before = ""
    if kind == "popbox":
        # The same file is the popbox server's config: its data (Maildirs, passwd
        # file with alice) under ``out``, and the sink delivers through its rules.
        sink = {"kind": "popbox", "user": "alice", "config": str(path)}
        before = f'data_dir = "{out}"\n'
        out.mkdir()
        (out / "passwd").write_text("alice:{PLAIN}secret::::::\n")
        (out / "passwd").chmod(0o600)
    account = account_entry(
        dovecot.pop3s_port,
        out,
        **tls_fields(tls_files.ca),
        delete="after_delivery",
        max_messages_per_run=6,
        max_in_flight=4,
        sinks=[sink],
    )
    write_fetch_config(path, account, before=before, state_dir=path.parent / "state")


def mbox_messages(path: Path) -> list[bytes]:
    """The messages of an mbox; each entry's From line must name its From address."""
    parts = re.split(rb"(?m)^From (\S+) [A-Z][a-z]{2} [^\n]*\n", path.read_bytes())
    assert parts[0] == b""
    found = []
    for sender, entry in zip(parts[1::2], parts[2::2], strict=True):
        body = re.sub(rb"(?m)^>(>*From )", rb"\1", entry[:-1])
        assert body.startswith(b"From: " + sender + b"\n")
        found.append(body)
    return sorted(found)


def written_messages(kind: str, out: Path) -> list[bytes]:
    """What the sink holds, as the message bodies the server had."""
    if kind == "maildir":
        return maildir_messages(out)
    if kind == "mbox":
        return mbox_messages(out)
    # The popbox store keeps CRLF line ends and writes the Delivered-To trace header.
    trace = b"Delivered-To: alice\r\n"
    stored = maildir_messages(out / "mail" / "alice")
    assert all(data.startswith(trace) for data in stored)
    return sorted(data[len(trace) :].replace(b"\r\n", b"\n") for data in stored)


@pytest.mark.parametrize("kind", ["maildir", "mbox", "popbox"])
def test_sigkill_at_random_points_loses_and_doubles_nothing(
    dovecot: DovecotServer, tls_files: Any, tmp_path: Path, kind: str
) -> None:
    rng = random.Random(int(os.environ.get("POPBOX_CRASH_SEED", "4")))
    expected = [crash_body(index) for index in range(MESSAGES)]
    for body in expected:
        dovecot.add_message("alice", body)
    out = tmp_path / "out"
    config = tmp_path / "popbox.toml"
    _write_config(config, dovecot, tls_files, out, kind)

    def arrivals() -> None:
        for index in range(MESSAGES, MESSAGES + 5):
            expected.append(message(index))
            dovecot.add_message("alice", message(index))

    killed = kill_rounds(config, rng, ROUNDS, arrivals)
    deadline = time.monotonic() + 120
    while dovecot.stored_messages("alice") and time.monotonic() < deadline:
        output: list[bytes] = []
        status = run_fetch(config, None, output)
        assert status == 0, output[-1].decode(errors="replace")[-1000:] + dovecot.log()[-3000:]
    print(f"crash rounds={ROUNDS} killed={killed}")
    assert killed >= ROUNDS // 3, "the kills should mostly land while the collector runs"
    assert written_messages(kind, out) == sorted(expected)
    assert dovecot.stored_messages("alice") == []
