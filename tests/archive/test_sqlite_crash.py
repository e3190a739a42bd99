"""Killed mid-add or mid-delete with SIGKILL: every entry an add returned for is
there and reads back byte-exact, none a delete confirmed comes back, no entry lacks
its objects, and reindex gives the same search results.

A child process adds messages (a third of them with one of three shared 100 KB
attachments, so object files are written, shared and freed) for two users and
deletes some of them. It is killed just before its k-th write, fsync, replace or
unlink, for a spread of k, so every step of an object's write and of a deletion's
cleanup is cut; then a loop of adds and deletes is killed at random moments, round
after round on the same archive. A fresh SqliteArchive audits after each kill.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from popbox.archive.base import MatchAll
from popbox.archive.query import parse_query
from popbox.archive.sqlite import INDEX_FILE, SqliteArchive
from support.crash import kill_before_call, run_until_killed

# Shared by the child and the audit: message n, always the same octets.
MAKE = """
import base64, random

def make(n):
    body = f"word{n} common text of message {n}\\r\\n".encode()
    head = f"From: sender{n % 7}@example.com\\r\\nTo: alice@example.com\\r\\n"
    head += f"Subject: message {n}\\r\\n"
    if n % 3:
        return head.encode() + b"\\r\\n" + body
    payload = random.Random(n % 9).randbytes(100_000)
    return (
        head.encode() + b'Content-Type: multipart/mixed; boundary="B"\\r\\n\\r\\n'
        b"--B\\r\\nContent-Type: text/plain\\r\\n\\r\\n" + body +
        b'--B\\r\\nContent-Type: application/octet-stream\\r\\n'
        b'Content-Disposition: attachment; filename="shared.bin"\\r\\n'
        b"Content-Transfer-Encoding: base64\\r\\n\\r\\n" + base64.encodebytes(payload) +
        b"--B--\\r\\n"
    )

def owner(n):
    return "alice" if n % 4 else "bob"
"""

CHILD = (
    kill_before_call("write", "fsync", "replace", "unlink")
    + MAKE
    + """
import asyncio
from pathlib import Path
from popbox.archive.base import ArchiveSource
from popbox.archive.sqlite import SqliteArchive

start = int(sys.argv[3])
count = int(sys.argv[4])

async def main():
    archive = SqliteArchive(Path(sys.argv[1]))
    ids = {}
    n = start
    while count < 0 or n < start + count:
        added = await archive.add(owner(n), make(n), source=ArchiveSource.DELIVERED)
        ids[n] = added.entry.id
        print("added", n, flush=True)
        if n % 5 == 4 and n - 2 in ids:
            print("deleting", n - 2, flush=True)
            await archive.delete(owner(n - 2), [ids.pop(n - 2)])
            print("deleted", n - 2, flush=True)
        n += 1
    await archive.close()
    print("calls", calls, flush=True)

asyncio.run(main())
"""
)

_namespace: dict[str, object] = {}
exec(MAKE, _namespace)
make = _namespace["make"]
owner = _namespace["owner"]


class Told:
    """What the children printed: adds that returned, deletes begun and confirmed."""

    def __init__(self) -> None:
        self.added: set[int] = set()
        self.deleting: set[int] = set()
        self.deleted: set[int] = set()

    def note(self, output: str) -> None:
        for line in output.splitlines():
            word, _, number = line.partition(" ")
            if word == "added":
                self.added.add(int(number))
            elif word == "deleting":
                self.deleting.add(int(number))
            elif word == "deleted":
                self.deleted.add(int(number))


async def audit(root: Path, told: Told) -> None:
    archive = SqliteArchive(root)
    try:
        found: dict[int, int] = {}
        for user in ("alice", "bob"):
            async for entry in archive.entries(user, MatchAll()):
                number = int(entry.subject.removeprefix("message "))
                assert owner(number) == user  # type: ignore[operator]
                data = b"".join([chunk async for chunk in archive.read(user, entry.id)])
                assert data == make(number)  # type: ignore[operator]
                assert number not in found, "a message kept twice"
                found[number] = entry.id
        assert not (set(found) & told.deleted), "a confirmed delete came back"
        missing = told.added - set(found) - told.deleting
        assert not missing, f"adds that returned are gone: {sorted(missing)}"
        queries = ["common", "word3", "sender2", "filename:shared", "-has:attachment"]
        before = {
            (user, query): [
                hit.entry.id
                for hit in (await archive.search(user, parse_query(query), limit=1000)).hits
            ]
            for user in ("alice", "bob")
            for query in queries
        }
        await archive.reindex()
        after = {
            (user, query): [
                hit.entry.id
                for hit in (await archive.search(user, parse_query(query), limit=1000)).hits
            ]
            for user in ("alice", "bob")
            for query in queries
        }
        assert after == before
    finally:
        await archive.close()
    # After reindex's cleanup: the object files are exactly those the index names.
    with sqlite3.connect(root / INDEX_FILE) as connection:
        named = {
            bytes(row[0]).hex()
            for row in connection.execute("SELECT digest FROM objects WHERE data IS NULL")
        }
    on_disk = {path.name.removesuffix(".zst") for path in (root / "objects").glob("*/*.zst")}
    assert on_disk == named
    assert not list((root / "objects").glob("*/.tmp-*"))


def test_killed_before_each_file_step(tmp_path: Path) -> None:
    count = 24
    done = run_until_killed(CHILD, str(tmp_path / "whole"), "-1", "0", str(count))
    calls = int(done.rsplit("calls ", 1)[1])
    assert calls > 10
    rng = random.Random(7)
    points = sorted(
        set(range(0, calls, max(1, calls // 25))) | {rng.randrange(calls) for _ in range(5)}
    )
    for kill_at in points:
        root = tmp_path / f"cut{kill_at}"
        told = Told()
        told.note(run_until_killed(CHILD, str(root), str(kill_at), "0", str(count)))
        if root.exists():
            asyncio.run(audit(root, told))


def test_killed_at_random_moments(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    told = Told()
    rng = random.Random()
    for round_number in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), "-1", str(round_number * 1000), "-1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(0.8, 2.5))
        child.send_signal(signal.SIGKILL)
        output, _ = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
        told.note(output)
        asyncio.run(audit(root, told))
    assert len(told.added) > 6
