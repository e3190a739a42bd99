"""Killed mid-delivery with a kept UIDL: every message a delivery returned for is there once
with its UIDL, and no message is ever there without it.

A child process delivers with ``deliver(uidl=)``, a session deletes the oldest message
(compacting ``popbox.uidls``), and it delivers again; it is killed with SIGKILL just
before its k-th write, fsync, link, rename, replace or unlink, for every k, so every
step of a delivery and of a compaction is cut once. It prints what returned (what a
caller was told). Then a loop of deliveries and sessions is killed at random moments,
round after round on the same Maildir. A fresh store audits after each kill.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from popbox.store import MaildirStore
from support.crash import kill_before_call, run_until_killed
from support.maildrop import read_all

CHILD = (
    kill_before_call("write", "fsync", "link", "rename", "replace", "unlink")
    + """
import asyncio
from pathlib import Path
from popbox.store import MaildirStore

start = int(sys.argv[3])
count = int(sys.argv[4])

store = MaildirStore(Path(sys.argv[1]))

async def deliver(n):
    await store.deliver("alice", f"Subject: {n}\\n\\nmessage {n}\\n".encode(), uidl=f"K{n}")
    print("delivered", n, flush=True)

async def main():
    n = start
    while count < 0 or n < start + count:
        await deliver(n)
        await deliver(n + 1)
        maildrop = await store.open_maildrop("alice")
        bodies = [b"".join([c async for c in maildrop.read_message(i)])
                  for i in range(len(maildrop.messages))]
        oldest = int(bodies[0].rsplit(b" ", 1)[1])
        print("deleting", oldest, flush=True)
        await maildrop.commit_deletions([0])
        print("deleted", oldest, flush=True)
        await deliver(n + 2)
        n += 3
    print("calls", calls, flush=True)

asyncio.run(main())
"""
)

_NUMBER = re.compile(rb"message (\d+)\n\Z")


def run_child(root: Path, kill_at: int, start: int = 0, count: int = 3) -> list[tuple[str, int]]:
    """Run the child until it is killed (or done); what it printed, as (word, number)."""
    output = run_until_killed(CHILD, str(root), str(kill_at), str(start), str(count))
    return [(word, int(n)) for word, n in (line.split() for line in output.splitlines())]


async def audit(root: Path, told: list[tuple[str, int]], where: str) -> set[int]:
    """Check the promises; the message numbers present."""
    store = MaildirStore(root)
    try:
        maildrop = await store.open_maildrop("alice")
        try:
            present: list[int] = []
            for index, info in enumerate(maildrop.messages):
                match = _NUMBER.search(await read_all(maildrop, index))
                assert match is not None, f"{where}: a partial message"
                n = int(match.group(1))
                assert info.uidl == f"K{n}", f"{where}: message {n} serves {info.uidl}"
                present.append(n)
            uidls = [info.uidl for info in maildrop.messages]
        finally:
            await maildrop.release()
    finally:
        await store.close()
    twice = [n for n, c in Counter(present).items() if c > 1]
    assert not twice, f"{where}: there twice: {twice}"
    assert len(set(uidls)) == len(uidls), f"{where}: a UIDL served twice"
    deleted = {n for word, n in told if word == "deleted"}
    # A QUIT under way when the kill came may or may not have deleted its message.
    deleting = {n for word, n in told if word == "deleting"}
    lost = {n for word, n in told if word == "delivered"} - deleting - set(present)
    assert not lost, f"{where}: delivered but lost: {lost}"
    assert not deleted & set(present), f"{where}: deleted but back"
    return set(present)


async def test_a_kill_at_any_step_of_deliveries_and_compaction_keeps_every_uidl(
    tmp_path: Path,
) -> None:
    told = run_child(tmp_path / "dry", -1)
    words = ["delivered", "delivered", "deleting", "deleted", "delivered", "calls"]
    assert [word for word, _ in told] == words
    points = told[-1][1]
    assert points > 15  # three deliveries' writes, fsyncs and links, and a commit's
    for kill_at in range(points + 1):
        root = tmp_path / f"kill{kill_at}"
        told = run_child(root, kill_at)
        if (root / "alice" / "cur").is_dir():
            await audit(root, told, f"killed at call {kill_at}, after {told}")


async def test_deliveries_killed_at_random_moments_round_after_round(tmp_path: Path) -> None:
    rng = random.Random(1939)
    told: list[tuple[str, int]] = []
    start = 0
    for round_ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), "-1", str(start), "-1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        time.sleep(rng.uniform(0.5, 1.5))
        child.kill()
        output, _ = child.communicate(timeout=30)
        told += [(word, int(n)) for word, n in (line.split() for line in output.splitlines())]
        present = await audit(tmp_path, told, f"round {round_}")
        start = max([n for _, n in told] + list(present), default=0) + 3
    assert any(word == "deleted" for word, _ in told)
