"""Killed mid-commit, mid-move and mid-sweep: no message lost, none in two folders, and
none back for a device whose QUIT was answered.

A child process runs two devices' QUITs (the second moves what both deleted to
Trash) and then, thirty-one days later, a sweep that empties the Trash. It is killed
with SIGKILL just before its k-th rename, unlink, replace or fsync, for every k, so
every step of the removals, the index and the state files is cut once. The child
says which QUITs returned (what a client was told +OK); a fresh store then audits
every folder's files and what each device sees.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from popbox.store import MaildirStore
from popbox.store.mailbox import Disposition, MailboxPolicy, MailboxView
from support.crash import kill_before_call, run_until_killed
from support.maildrop import read_all

MESSAGES = [f"Subject: {n}\n\nmessage {n}\n".encode() for n in range(5)]
POLICY = MailboxPolicy(disposition=Disposition.TRASH)
PHONE = MailboxView(device="phone", policy=POLICY)
LAPTOP = MailboxView(device="laptop", policy=POLICY)
# The phone deletes messages 0, 1 and 2 and the laptop 0 and 1: at the laptop's QUIT
# both holding devices deleted 0 and 1, which move to Trash; 2 stays for the laptop.
PHONE_DELETES = [0, 1, 2]
LAPTOP_DELETES = [0, 1]

CHILD = (
    kill_before_call("rename", "replace", "unlink", "fsync")
    + """
import asyncio, time
from pathlib import Path
from popbox.store import MaildirStore
from popbox.store.mailbox import Disposition, MailboxPolicy, MailboxView

skipped = 0.0
store = MaildirStore(Path(sys.argv[1]), clock=lambda: time.time() + skipped)
policy = MailboxPolicy(disposition=Disposition.TRASH)

async def main():
    global skipped
    for device, doomed in (("phone", [0, 1, 2]), ("laptop", [0, 1])):
        maildrop = await store.open_maildrop("alice", MailboxView(device=device, policy=policy))
        # As a client does: by what it sees (its UIDLs), not by a message number.
        wanted = [f"message {n}".encode() for n in doomed]
        indexes = []
        for index in range(len(maildrop.messages)):
            body = b"".join([chunk async for chunk in maildrop.read_message(index)])
            if any(body.endswith(w + b"\\n") for w in wanted):
                indexes.append(index)
        await maildrop.commit_deletions(indexes)
        print(device, flush=True)
    skipped = 31 * 86400
    await store.sweep("alice", policy)
    print("swept", calls, flush=True)

asyncio.run(main())
"""
)


async def prepare(root: Path) -> None:
    store = MaildirStore(root)
    for message in MESSAGES:
        await store.deliver("alice", message)
    for view in (PHONE, LAPTOP):  # both devices known and holding
        maildrop = await store.open_maildrop("alice", view)
        await maildrop.release()


def run_child(root: Path, kill_at: int) -> list[str]:
    """Run the child until it is killed (or done); the lines it printed."""
    return run_until_killed(CHILD, str(root), str(kill_at)).split("\n")


def stored(maildir: Path) -> list[bytes]:
    return [path.read_bytes() for sub in ("cur", "new") for path in (maildir / sub).glob("*")]


async def visible(store: MaildirStore, view: MailboxView) -> list[bytes]:
    maildrop = await store.open_maildrop("alice", view)
    try:
        return [await read_all(maildrop, i) for i in range(len(maildrop.messages))]
    finally:
        await maildrop.release()


async def audit(root: Path, told: list[str], kill_at: int) -> None:
    where = f"killed at call {kill_at}, after {told}"
    inbox = root / "alice"
    trash = inbox / ".Trash"
    in_inbox = stored(inbox)
    in_trash = stored(trash) if (trash / "cur").is_dir() else []
    counts = Counter(in_inbox + in_trash)
    assert all(count == 1 for count in counts.values()), f"{where}: in two places: {counts}"
    swept = "laptop" in told  # the sweep may have begun: Trash may be empty(ing)
    for n, message in enumerate(MESSAGES):
        if n in LAPTOP_DELETES:
            assert message in counts or swept, f"{where}: message {n} lost"
            if message in in_trash:
                continue
        assert message in in_inbox or n in LAPTOP_DELETES, f"{where}: message {n} lost"
    if "laptop" in told:
        assert not any(MESSAGES[n] in in_inbox for n in LAPTOP_DELETES), where
    store = MaildirStore(root)  # a restarted server
    try:
        phone = await visible(store, PHONE)
        laptop = await visible(store, LAPTOP)
    finally:
        await store.close()
    if "phone" in told:
        assert not any(MESSAGES[n] in phone for n in PHONE_DELETES), f"{where}: back: {phone}"
    if "laptop" in told:
        assert not any(MESSAGES[n] in laptop for n in LAPTOP_DELETES), f"{where}: {laptop}"
    for n in range(3, len(MESSAGES)):  # nobody deleted these
        assert MESSAGES[n] in phone, where
        assert MESSAGES[n] in laptop, where


async def test_a_kill_at_any_step_of_commits_moves_and_sweeps_keeps_every_promise(
    tmp_path: Path,
) -> None:
    dry = tmp_path / "dry"
    await prepare(dry)
    last = run_child(dry, -1)
    assert last[:2] == ["phone", "laptop"]
    points = int(last[2].split()[1])
    assert stored(dry / "alice" / ".Trash") == []  # the sweep emptied the Trash
    assert points > 20  # removals, index and state writes in three folders' worth
    for kill_at in range(points + 1):
        root = tmp_path / f"kill{kill_at}"
        await prepare(root)
        told = [line for line in run_child(root, kill_at) if line]
        await audit(root, [line.split()[0] for line in told], kill_at)


@pytest.mark.parametrize("kill_at", [0, 2, 6, 12])
async def test_a_second_run_after_a_kill_finishes_the_job(tmp_path: Path, kill_at: int) -> None:
    """What a kill left behind (temporary files, a half-done commit) does not stop
    the next run: the same QUITs and sweep complete, and the Trash is emptied."""
    await prepare(tmp_path)
    run_child(tmp_path, kill_at)
    told = [line for line in run_child(tmp_path, -1) if line]
    assert [line.split()[0] for line in told] == ["phone", "laptop", "swept"]
    assert stored(tmp_path / "alice" / ".Trash") == []
    assert sorted(stored(tmp_path / "alice")) == sorted(MESSAGES[2:])
