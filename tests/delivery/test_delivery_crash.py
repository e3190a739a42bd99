"""Crash safety of LMTP delivery: SIGKILL ``popbox serve`` at random moments, then audit.

The promise an MTA relies on (RFC 2033, and issue 3): a 250 reply means the message
is on disk for good. So after every kill, every message the client saw acknowledged
is present exactly once, whatever is present is a whole message (never a prefix),
and the Maildir opens cleanly with sizes that agree with the files. Messages whose
reply never arrived may be there or not; the MTA will resend them.
"""

from __future__ import annotations

import asyncio
import random
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from postfix_instance import free_port

from popbox.store.maildir import MaildirStore
from popbox.wireform import wire_size

USERS = ("alice", "bob")
# How long `popbox serve` may take to listen (imports, passwd file, first-run cert).
START_TIMEOUT = 30.0
# Bounded: enough rounds to land kills before, during and after the fsync and rename
# of a delivery, few enough for a 2-core CI box (about a second per round).
ROUNDS = 20
# Kill window after the server is up. Deliveries of up to 512 KiB each take a few
# milliseconds to tens of milliseconds, so kills spread over many of them.
KILL_AFTER = (0.05, 0.8)
MESSAGE_ID = re.compile(rb"^Message-ID: <crash-(\d+)@popbox\.test>\r$", re.MULTILINE)


def make_message(number: int, rng: random.Random) -> bytes:
    lines = [
        f"Message-ID: <crash-{number}@popbox.test>".encode(),
        f"Subject: crash round message {number}".encode(),
        b"",
    ]
    # Random size, so that a truncated copy could never pass for a whole one.
    for _ in range(rng.randint(1, 8000)):
        lines.append(rng.randbytes(30).hex().encode())
    return b"\r\n".join(lines) + b"\r\n"


def write_config(directory: Path) -> tuple[Path, int]:
    """A popbox.toml for the server under test, and its LMTP port."""
    passwd = directory / "passwd"
    passwd.write_text("".join(f"{user}:{{PLAIN}}secret::::::\n" for user in USERS))
    passwd.chmod(0o600)
    port = free_port()
    config = directory / "popbox.toml"
    config.write_text(
        f'data_dir = "{directory}"\n'
        f'[pop3]\nlisten = ["127.0.0.1:{free_port()}"]\ntls_listen = []\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{port}"]\n'
    )
    return config, port


def start_server(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Run the real server, `popbox serve`, and wait until LMTP accepts connections."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "popbox", "serve", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    pytest.fail(f"popbox serve did not start:\n{log.read_text(errors='replace')}")


def deliver_until_killed(
    port: int,
    rng: random.Random,
    next_number: int,
    sent: dict[int, bytes],
    acked: list[tuple[str, int]],
) -> int:
    """Send two-recipient messages until the connection dies; return the next number."""
    try:
        with smtplib.LMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("crash.test")
            while True:
                number = next_number
                next_number += 1
                sent[number] = make_message(number, rng)
                client.mail("sender@example.net")
                for user in USERS:
                    client.rcpt(f"{user}@example.test")
                replies = [client.data(sent[number])]
                replies.append(client.getreply())
                for user, (code, _) in zip(USERS, replies, strict=True):
                    if code == 250:
                        acked.append((user, number))
    except (smtplib.SMTPException, OSError):
        # The kill: the connection drops somewhere in the conversation.
        return next_number


async def audit(root: Path, sent: dict[int, bytes], acked: list[tuple[str, int]]) -> int:
    """Open every maildrop as a POP3 login would and check the promises; count mail."""
    store = MaildirStore(root)
    total = 0
    try:
        for user in USERS:
            drop = await store.open_maildrop(user)
            try:
                numbers = []
                for index, info in enumerate(drop.messages):
                    data = b"".join([chunk async for chunk in drop.read_message(index)])
                    match = MESSAGE_ID.search(data)
                    assert match is not None, f"{user}: a message without its ID: {data[:200]!r}"
                    number = int(match.group(1))
                    trace = (
                        b"Return-Path: <sender@example.net>\r\n"
                        b"Delivered-To: %s@example.test\r\n" % user.encode()
                    )
                    assert data == trace + sent[number], f"{user}: message {number} is partial"
                    # The index (LIST sizes) agrees with what RETR would send.
                    assert info.size == wire_size(data)
                    numbers.append(number)
                counts = Counter(numbers)
                duplicated = [n for n, c in counts.items() if c > 1]
                assert not duplicated, f"{user}: delivered twice: {duplicated}"
                missing = [n for u, n in acked if u == user and n not in counts]
                assert not missing, f"{user}: acknowledged with 250 but lost: {missing}"
                usage = await store.usage(user)
                assert usage.messages == len(numbers)
                total += len(numbers)
            finally:
                await drop.release()
    finally:
        await store.close()
    return total


def test_sigkill_during_deliveries_loses_no_acknowledged_message(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    root = tmp_path / "mail"
    config, port = write_config(tmp_path)
    sent: dict[int, bytes] = {}
    acked: list[tuple[str, int]] = []
    next_number = 1
    for _ in range(ROUNDS):
        process = start_server(config, port, tmp_path / "serve.log")
        killer = threading.Timer(rng.uniform(*KILL_AFTER), process.kill)
        killer.start()
        try:
            next_number = deliver_until_killed(port, rng, next_number, sent, acked)
        finally:
            killer.cancel()
            process.kill()
            process.wait(10)
        # Audit after every kill: a later round must not mend an earlier loss.
        asyncio.run(audit(root, sent, acked))
    stored = asyncio.run(audit(root, sent, acked))
    # The loop really delivered, and really interrupted deliveries in flight.
    assert len(acked) >= ROUNDS
    assert len(sent) > len(acked) // len(USERS)
    print(f"crash loop: {ROUNDS} kills, {len(sent)} messages sent, "
          f"{len(acked)} acknowledged deliveries, {stored} stored")
