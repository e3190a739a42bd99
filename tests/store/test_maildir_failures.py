"""MaildirStore when things go wrong: dead lock holders, failing deletions, a damaged
index, a full disk. Every failure is real (a killed process, a mounted tmpfs, a file
that cannot be unlinked), because the tests run as root and permissions stop nothing.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from popbox.errors import MaildropInUse, StoreError
from popbox.store import MaildirStore
from popbox.store.index_file import INDEX_NAME, INDEX_TMP_NAME
from support.maildrop import message_files, read_all

HOLD_LOCK = """
import asyncio, sys, time
from pathlib import Path
from popbox.store import MaildirStore

async def main():
    maildrop = await MaildirStore(Path(sys.argv[1])).open_maildrop("alice")
    print(len(maildrop.messages), flush=True)
    time.sleep(120)

asyncio.run(main())
"""


async def deliver_numbered(store: MaildirStore, count: int) -> list[bytes]:
    bodies = [f"message {n}\n".encode() for n in range(count)]
    for body in bodies:
        await store.deliver("alice", body)
    return bodies


async def test_lock_dies_with_the_process_that_held_it(maildir_store: MaildirStore) -> None:
    await deliver_numbered(maildir_store, 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(maildir_store.root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "2"  # the child holds the lock
        with pytest.raises(MaildropInUse):
            await maildir_store.open_maildrop("alice")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    maildrop = await maildir_store.open_maildrop("alice")
    assert len(maildrop.messages) == 2  # the killed session deleted nothing
    await maildrop.release()


DELIVER_FROM_STDIN = """
import asyncio, sys
from pathlib import Path
from popbox.store import MaildirStore

async def main():
    key = await MaildirStore(Path(sys.argv[1])).deliver_file(sys.argv[2], sys.stdin.buffer)
    print(key, flush=True)

asyncio.run(main())
"""


async def test_killed_delivery_leaves_nothing_in_new(maildir_store: MaildirStore) -> None:
    """A crash mid-delivery: the message is not there at all, never half there."""
    await maildir_store.deliver("alice", b"earlier\n")
    child = subprocess.Popen(
        [sys.executable, "-c", DELIVER_FROM_STDIN, str(maildir_store.root), "alice"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None
    tmp = maildir_store.maildir("alice") / "tmp"
    try:
        child.stdin.write(b"Subject: half\n\n" + b"x" * 1_000_000)
        child.stdin.flush()
        for _ in range(200):  # until the child has started writing its tmp/ file
            if any(path.stat().st_size for path in tmp.iterdir()):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the delivering process never wrote to tmp/")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdin.close()
        if child.stdout is not None:
            child.stdout.close()
    maildrop = await maildir_store.open_maildrop("alice")
    assert [await read_all(maildrop, i) for i in range(len(maildrop.messages))] == [b"earlier\n"]
    await maildrop.release()


DELIVER_MANY = """
import asyncio, sys
from pathlib import Path
from popbox.store import MaildirStore

async def main():
    store = MaildirStore(Path(sys.argv[1]))
    for n in range(40):
        await store.deliver("alice", f"{sys.argv[2]} {n}\\n".encode())

asyncio.run(main())
"""


async def test_processes_delivering_at_once_never_collide(maildir_store: MaildirStore) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", DELIVER_MANY, str(maildir_store.root), name])
        for name in ("left", "right")
    ]
    maildrop = await maildir_store.open_maildrop("alice")  # sessions run alongside
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    await maildrop.release()
    maildrop = await maildir_store.open_maildrop("alice")
    stored = {await read_all(maildrop, i) for i in range(len(maildrop.messages))}
    expected = {f"{name} {n}\n".encode() for name in ("left", "right") for n in range(40)}
    assert stored == expected
    assert len(maildrop.messages) == 80
    await maildrop.release()


async def test_two_stores_in_one_process_exclude_each_other(
    maildir_store: MaildirStore,
) -> None:
    other = MaildirStore(maildir_store.root)
    maildrop = await maildir_store.open_maildrop("alice")
    with pytest.raises(MaildropInUse):
        await other.open_maildrop("alice")
    await maildrop.release()
    await (await other.open_maildrop("alice")).release()


async def test_failed_deletion_is_reported_and_releases_the_lock(
    maildir_store: MaildirStore,
) -> None:
    bodies = await deliver_numbered(maildir_store, 3)
    maildrop = await maildir_store.open_maildrop("alice")
    maildir = maildir_store.maildir("alice")
    # unlink() of a directory fails (EISDIR) even for root: swap one message for one.
    stuck = next(p for p in message_files(maildir) if p.read_bytes() == bodies[1])
    stuck.unlink()
    stuck.mkdir()
    with pytest.raises(StoreError):
        await maildrop.commit_deletions([0, 1, 2])
    assert stuck.is_dir()
    after = await maildir_store.open_maildrop("alice")  # the lock was released
    assert list(after.messages) == []  # the other two are gone; a directory is no message
    await after.release()


async def test_index_write_failure_on_commit_is_reported(maildir_store: MaildirStore) -> None:
    await deliver_numbered(maildir_store, 2)
    maildrop = await maildir_store.open_maildrop("alice")
    blocker = maildir_store.maildir("alice") / INDEX_TMP_NAME
    blocker.mkdir()  # the atomic index write cannot create its temporary file
    with pytest.raises(StoreError):
        await maildrop.commit_deletions([0])
    blocker.rmdir()
    # The unlink was durable before the index write; the next login reconciles.
    after = await maildir_store.open_maildrop("alice")
    assert [await read_all(after, 0)] == [b"message 1\n"]
    await after.release()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"garbage\x00\xff", id="garbage"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 1]), id="flipped-bit"),
        pytest.param(lambda data: data.replace(b"count=3", b"count=9"), id="wrong-count"),
        pytest.param(lambda data: data + data[-17:], id="appended"),
        pytest.param(lambda data: data.replace(b"index 3 ", b"index 99 "), id="future-version"),
        pytest.param(None, id="missing"),
    ],
)
async def test_damaged_index_is_rebuilt_without_losing_mail(
    maildir_store: MaildirStore, damage: object
) -> None:
    bodies = await deliver_numbered(maildir_store, 3)
    maildrop = await maildir_store.open_maildrop("alice")
    old_uidls = [info.uidl for info in maildrop.messages]
    await maildrop.release()
    index = maildir_store.maildir("alice") / INDEX_NAME
    if damage is None:
        index.unlink()
    else:
        assert callable(damage)
        index.write_bytes(damage(index.read_bytes()))
    rebuilt = await maildir_store.open_maildrop("alice")
    assert sorted([await read_all(rebuilt, i) for i in range(3)]) == bodies
    new_uidls = [info.uidl for info in rebuilt.messages]
    assert len(set(new_uidls)) == 3
    await rebuilt.release()
    # The rebuilt index has a larger UIDVALIDITY (kept in the lock file too, for when
    # the header is unreadable): no old UIDL comes back, even within the same second.
    assert not set(new_uidls) & set(old_uidls)
    again = await maildir_store.open_maildrop("alice")
    assert [info.uidl for info in again.messages] == new_uidls
    await again.release()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real ENOSPC. Needs the right to mount (root, no seccomp veto)."""
    mountpoint = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs for a real ENOSPC needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_disk_full_during_delivery_leaves_no_partial_file(full_disk: Path) -> None:
    store = MaildirStore(full_disk / "mail")
    await store.deliver("alice", b"fits\n")
    with pytest.raises(StoreError) as raised:
        await store.deliver("alice", b"x" * (2 * 1024 * 1024))
    assert "No space left" in str(raised.value)
    maildir = store.maildir("alice")
    assert list((maildir / "tmp").iterdir()) == []
    assert [p.read_bytes() for p in message_files(maildir)] == [b"fits\n"]
    # Streaming delivery fails the same clean way, and the maildrop still works.
    with pytest.raises(StoreError):
        await store.deliver_file("alice", io.BytesIO(b"y" * (2 * 1024 * 1024)))
    assert list((maildir / "tmp").iterdir()) == []
    maildrop = await store.open_maildrop("alice")
    assert [await read_all(maildrop, 0)] == [b"fits\n"]
    await maildrop.release()
