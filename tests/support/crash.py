"""The crash auditor: after a SIGKILL, check every maildrop against what clients were told;
and a child process that kills itself just before its k-th file system call.

Both crash suites (LMTP delivery alone, and delivery with POP3 QUITs and index updates)
kill ``popbox serve`` at random moments and then ask the same questions of what a
restarted server shows: is every message whole, is none there twice, is every message
acknowledged with LMTP 250 still there, and has none whose deletion a QUIT confirmed
come back. Each suite passes what it knows; the auditor opens each maildrop as a POP3
login would (a fresh MaildirStore, the lock, the snapshot) and asserts.
"""

from __future__ import annotations

import contextlib
import poplib
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

from popbox.store.maildir import MaildirStore
from support.maildrop import read_all
from support.serverproc import ClosingPOP3, ServerProcess
from support.wire import lf, wire

__all__ = [
    "audit_maildrops",
    "deliver_until_killed",
    "kill_before_call",
    "kill_rounds",
    "run_until_killed",
    "sessions_until_killed",
]

# The start of a child's source: it counts its calls in ``calls`` and SIGKILLs itself
# just before the ``kill_at``-th (its second argument; -1: never).
_KILLER = """
import os, signal, sys

kill_at = int(sys.argv[2])
calls = 0

def _counted(real):
    def call(*args, **kwargs):
        global calls
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        calls += 1
        return real(*args, **kwargs)
    return call
"""


def kill_before_call(*names: str) -> str:
    """Python source to put before a child's own: the child (run with its root as first
    argument and ``kill_at`` as second, see ``run_until_killed``) is killed just before
    its ``kill_at``-th call of any of ``os.NAME``, so a loop over ``kill_at`` cuts every
    step once; the child may print ``calls`` at its end to say how many there were."""
    patch = "".join(f"os.{name} = _counted(os.{name})\n" for name in names)
    return _KILLER + patch


Message = tuple[str, int]  # (user, message number)


async def audit_maildrops(
    root: Path,
    users: Iterable[str],
    *,
    message_id: re.Pattern[bytes],
    sent: Mapping[int, bytes],
    acked: Iterable[Message],
    deleted: Collection[Message] = frozenset(),
    maybe_deleted: Collection[Message] = frozenset(),
    trace: Callable[[str], bytes] | None = None,
    saw_uidl: Callable[[str, int, str], None] | None = None,
) -> int:
    """Audit the Maildirs under ``root``; the number of messages found, all users together.

    ``message_id`` finds a message's number (its first group) in the stored bytes;
    ``sent`` maps each number to the message as the client sent it. ``acked`` are the
    deliveries the server confirmed: each must be present, unless it is also in
    ``maybe_deleted`` (a DELE whose QUIT was sent: the commit may have happened before
    the kill). ``deleted`` are deletions a QUIT confirmed: none may be present.

    With ``trace``, the trace headers the server adds for a user, a stored message must
    be exactly those headers and the message sent; without, it must end with the message
    sent (line ends aside). ``saw_uidl`` is told every (user, number, UIDL) seen, so a
    suite can check that UIDLs never change.
    """
    acked = set(acked)
    store = MaildirStore(root)
    total = 0
    try:
        for user in users:
            drop = await store.open_maildrop(user)
            try:
                present = []
                for index, info in enumerate(drop.messages):
                    data = await read_all(drop, index)
                    match = message_id.search(data)
                    assert match is not None, f"{user}: a message without its ID: {data[:200]!r}"
                    number = int(match.group(1))
                    if trace is not None:
                        whole = data == trace(user) + sent[number]
                    else:
                        whole = lf(data).endswith(lf(sent[number]))
                    assert whole, f"{user}: message {number} is partial"
                    assert (user, number) not in deleted, (
                        f"{user}: message {number} came back after its QUIT +OK"
                    )
                    # The index (LIST sizes) agrees with what RETR would send.
                    assert info.size == len(wire(data)), f"{user}: message {number}: size"
                    if saw_uidl is not None:
                        saw_uidl(user, number, info.uidl)
                    present.append(number)
                counts = Counter(present)
                duplicated = sorted(n for n, c in counts.items() if c > 1)
                assert not duplicated, f"{user}: delivered twice: {duplicated}"
                lost = sorted(
                    n for u, n in acked - set(maybe_deleted) if u == user and n not in counts
                )
                assert not lost, f"{user}: acknowledged with 250 but lost: {lost}"
                usage = await store.usage(user)
                assert usage.messages == len(present), f"{user}: usage disagrees"
                total += len(present)
            finally:
                await drop.release()
    finally:
        await store.close()
    return total


def kill_rounds(
    server: ServerProcess,
    rng: random.Random,
    *,
    rounds: int,
    kill_after: tuple[float, float],
    clients: Sequence[Callable[[random.Random], None]],
    errors: list[BaseException],
    audit: Callable[[], object],
) -> None:
    """Start ``server``, run each client in a thread (each with a Random seeded from
    ``rng``) until a SIGKILL at a random moment within ``kill_after`` seconds, then
    audit; ``rounds`` times. Audited after every kill: a later round must not mend an
    earlier loss. Clients report what the server showed them wrongly in ``errors``."""
    for _ in range(rounds):
        server.start()
        threads = [
            threading.Thread(target=client, args=(random.Random(rng.random()),))
            for client in clients
        ]
        for thread in threads:
            thread.start()
        killer = threading.Timer(rng.uniform(*kill_after), server.kill)
        killer.start()
        for thread in threads:
            thread.join(60)
        killer.cancel()
        server.kill()
        assert not errors, errors[0]
        audit()


def deliver_until_killed(
    server: ServerProcess,
    rng: random.Random,
    next_message: Callable[[random.Random], tuple[str, bytes, Callable[[], None]]],
) -> None:
    """Deliver over one LMTP connection until the server dies. ``next_message`` gives
    the recipient, the message and what to note once the server answered 250."""
    with (
        contextlib.suppress(smtplib.SMTPException, OSError),
        smtplib.LMTP("127.0.0.1", server.lmtp_port, timeout=10) as client,
    ):
        client.ehlo("crash.test")
        while True:
            recipient, data, acked = next_message(rng)
            client.mail("sender@example.net")
            client.rcpt(f"{recipient}@example.test")
            if client.data(data)[0] == 250:
                acked()


def sessions_until_killed(
    server: ServerProcess,
    rng: random.Random,
    errors: list[BaseException],
    session: Callable[[poplib.POP3, random.Random], None],
) -> None:
    """Run POP3 ``session``s one after another until the server dies; an assertion
    about what the server showed goes into ``errors``."""
    try:
        while True:
            client = ClosingPOP3("127.0.0.1", server.pop3_port, timeout=10)
            try:
                session(client, rng)
            finally:
                client.close()
    except (OSError, EOFError, poplib.error_proto):
        return  # the kill
    except BaseException as exc:
        errors.append(exc)


def run_until_killed(code: str, *args: str) -> str:
    """Run ``code`` (``kill_before_call`` and the child's own source) until it is killed
    or done; what it printed. Any other end of the child fails the test."""
    child = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    if child.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed: {child.stderr}")
    return child.stdout
