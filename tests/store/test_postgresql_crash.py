"""Killed mid-delivery and mid-commit, round after round: with PostgreSQL nothing a
caller was told is stored is lost or doubled, no deleted message comes back, and the
folder opens again once the dead process's lease runs out.

A child process delivers (small messages in one statement, big ones streamed with
COPY, some with a kept UIDL), opens the folder, deletes the oldest message and
delivers again, printing what returned; it is killed with SIGKILL at a random
moment, so the kill falls inside statements, transactions and commits of every
kind. The database itself keeps running: what is tested is that popbox's steps are
transactions. After each kill a fresh store audits the folder as a login sees it.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from popbox.errors import MaildropInUse
from popbox.store.postgresql import PostgresStore
from popbox.store.postgresql_schema import CHUNK_SIZE
from popbox.wireform import wire_size
from support.maildrop import read_all
from support.pgstore import postgres_store

# The child's lease: short, so that the audit gets in soon after the kill.
LEASE_SECONDS = 1.0

CHILD = f"""
import asyncio, sys
from support.pgstore import postgres_store

start = int(sys.argv[2])
store = postgres_store(sys.argv[1], lease_seconds={LEASE_SECONDS})

def message(n):
    body = b"big line\\n" * ({CHUNK_SIZE} // 4) if n % 3 == 2 else b""
    return f"Subject: {{n}}\\n\\n".encode() + body + f"message {{n}}\\n".encode()

async def deliver(n):
    await store.deliver("alice", message(n), uidl=f"K{{n}}" if n % 5 == 0 else None)
    print("delivered", n, flush=True)

async def main():
    n = start
    while True:
        await deliver(n)
        await deliver(n + 1)
        maildrop = await store.open_maildrop("alice")
        body = b"".join([c async for c in maildrop.read_message(0)])
        oldest = int(body.rsplit(b" ", 1)[1])
        print("deleting", oldest, flush=True)
        await maildrop.commit_deletions([0])
        print("deleted", oldest, flush=True)
        await deliver(n + 2)
        n += 3

asyncio.run(main())
"""

TESTS = Path(__file__).parent.parent
_NUMBER = re.compile(rb"message (\d+)\n\Z")


def expected(n: int) -> bytes:
    body = b"big line\n" * (CHUNK_SIZE // 4) if n % 3 == 2 else b""
    return f"Subject: {n}\n\n".encode() + body + f"message {n}\n".encode()


async def audit(store: PostgresStore, told: list[tuple[str, int]], where: str) -> set[int]:
    """Check every promise the child made before it died; the numbers present."""
    for _ in range(400):
        try:
            maildrop = await store.open_maildrop("alice")
            break
        except MaildropInUse:  # the dead child's lease has not run out yet
            await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"{where}: the dead process's lease never ran out")
    try:
        present: list[int] = []
        for index, info in enumerate(maildrop.messages):
            data = await read_all(maildrop, index)
            match = _NUMBER.search(data)
            assert match is not None, f"{where}: a partial message"
            n = int(match.group(1))
            assert data == expected(n), f"{where}: message {n} is damaged"
            assert info.size == wire_size(data), f"{where}: message {n}: size"
            if n % 5 == 0:
                assert info.uidl == f"K{n}", f"{where}: message {n} lost its UIDL"
            present.append(n)
        uidls = list(maildrop.messages.uidls)
    finally:
        await maildrop.release()
    twice = [n for n, c in Counter(present).items() if c > 1]
    assert not twice, f"{where}: there twice: {twice}"
    assert len(set(uidls)) == len(uidls), f"{where}: a UIDL served twice"
    deleting = {n for word, n in told if word == "deleting"}
    deleted = {n for word, n in told if word == "deleted"}
    lost = {n for word, n in told if word == "delivered"} - deleting - set(present)
    assert not lost, f"{where}: delivered but lost: {lost}"
    assert not deleted & set(present), f"{where}: deleted but back"
    usage = await store.usage("alice")
    assert usage.messages == len(present), f"{where}: the counters disagree"
    return set(present)


async def test_deliveries_and_commits_killed_at_random_moments(postgres_dsn: str) -> None:
    rng = random.Random(2033)
    store = postgres_store(postgres_dsn)
    await store.usage("alice")  # the tables exist before the first child races to them
    told: list[tuple[str, int]] = []
    start = 0
    try:
        for round_ in range(6):
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, postgres_dsn, str(start)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=TESTS,  # the child imports support.pgstore
            )
            assert child.stdout is not None
            time.sleep(rng.uniform(0.6, 1.6))
            child.kill()
            output, _ = child.communicate(timeout=30)
            told += [(w, int(n)) for w, n in (line.split() for line in output.splitlines())]
            present = await audit(store, told, f"round {round_}")
            start = max([n for _, n in told] + list(present), default=0) + 3
        assert any(word == "deleted" for word, _ in told)
    finally:
        await store.close()

