"""MaildirStore's device state beyond the contract: its file, its versions, its cost.

Each folder keeps ``popbox.devices`` beside its index: versioned JSON, refused when
damaged or written by a newer popbox (a guess could remove mail a device still
wants), rebased when the index was rebuilt. It is written only when it changed, so
a single device's QUIT costs what it did before devices existed, and what devices
see is kept with the index, so a warm login of a device with deletions builds and
renders nothing again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from popbox.errors import MaildropInUse, PermanentStoreError
from popbox.store import MaildirStore
from popbox.store.devices import STATE_FORMAT
from popbox.store.index_file import INDEX_NAME
from popbox.store.mailbox import MailboxPolicy, MailboxView
from popbox.store.maildir_state import STATE_NAME
from support.clock import FakeClock
from support.maildrop import read_all

PHONE = MailboxView(device="phone")
LAPTOP = MailboxView(device="laptop")


async def deliver(store: MaildirStore, count: int, folder: str = "INBOX") -> list[bytes]:
    bodies = [f"Subject: {n}\n\nmessage {n}\n".encode() for n in range(count)]
    for body in bodies:
        await store.deliver("alice", body, folder=folder)
    return bodies


async def seen(store: MaildirStore, view: MailboxView) -> list[bytes]:
    maildrop = await store.open_maildrop("alice", view)
    try:
        return [await read_all(maildrop, i) for i in range(len(maildrop.messages))]
    finally:
        await maildrop.release()


async def quit_deleting(store: MaildirStore, view: MailboxView, indexes: list[int]) -> None:
    maildrop = await store.open_maildrop("alice", view)
    await maildrop.commit_deletions(indexes)


def state_file(store: MaildirStore, folder: str = "INBOX") -> Path:
    return store.maildir("alice", folder) / STATE_NAME


async def test_the_state_is_a_versioned_private_file_beside_the_index(
    maildir_store: MaildirStore,
) -> None:
    await deliver(maildir_store, 3)
    await seen(maildir_store, LAPTOP)
    await quit_deleting(maildir_store, PHONE, [1])  # the laptop still holds it
    path = state_file(maildir_store)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_bytes())
    assert document["format"] == STATE_FORMAT
    assert sorted(document["devices"]) == ["laptop", "phone"]
    assert document["devices"]["laptop"]["deleted"] == []
    assert len(document["devices"]["phone"]["deleted"]) == 2  # one range
    assert not (path.parent / "popbox.devices.tmp").exists()


@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"format": STATE_FORMAT + 1, "uidvalidity": 1}).encode(),
        b'{"format": 1, "uidvalidity": 1, "devices": {',  # cut short
        b'{"format": 1, "uidvalidity": 1, "devices": {}, "retrieved": [[1], []],'
        b' "hidden": []}',  # retrieval ids without their times
        b"\x00" * 40,
    ],
    ids=["newer", "truncated", "inconsistent", "garbage"],
)
async def test_a_state_that_cannot_be_trusted_refuses_the_login(
    maildir_store: MaildirStore, tmp_path: Path, content: bytes
) -> None:
    """Refused rather than guessed: an empty guess would let devices re-download
    everything at best, and a wrong one remove what a device still wants."""
    await deliver(maildir_store, 2)
    await seen(maildir_store, PHONE)
    state_file(maildir_store).write_bytes(content)
    for store in (maildir_store, MaildirStore(tmp_path / "mail")):  # cached or not
        with pytest.raises(PermanentStoreError, match=r"newer|damaged"):
            await store.open_maildrop("alice", PHONE)
    with pytest.raises(PermanentStoreError):
        await maildir_store.sweep("alice", MailboxPolicy())
    assert state_file(maildir_store).read_bytes() == content  # left for the operator
    # The lock was given back, and delivery never reads the state.
    await maildir_store.deliver("alice", b"Subject: still\n\ndelivered\n")
    with pytest.raises(PermanentStoreError):
        await maildir_store.open_maildrop("alice", PHONE)
    state_file(maildir_store).unlink()  # the operator's way out: devices start afresh
    assert len(await seen(maildir_store, PHONE)) == 3


async def test_a_rebuilt_index_gives_every_device_the_whole_folder_again(
    maildir_store: MaildirStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The deletions name UIDs of the old index; with new UIDs they would hide the
    wrong messages, so they go, and devices see (and download) everything once."""
    bodies = await deliver(maildir_store, 4)
    await seen(maildir_store, LAPTOP)
    await quit_deleting(maildir_store, PHONE, [0, 2])
    assert await seen(maildir_store, PHONE) == [bodies[1], bodies[3]]
    (maildir_store.maildir("alice") / INDEX_NAME).unlink()
    fresh = MaildirStore(maildir_store.root)
    with caplog.at_level(logging.WARNING):
        assert await seen(fresh, PHONE) == bodies
    assert "index was rebuilt" in caplog.text
    stored = json.loads(state_file(fresh).read_bytes())
    assert stored["devices"]["phone"]["deleted"] == []  # written back, rebased
    assert sorted(stored["devices"]) == ["laptop", "phone"]  # the devices stay known


async def test_a_single_device_quit_writes_no_state(
    maildir_store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One device, DELETE: the state's bytes do not change at QUIT (the deletions go
    with their messages), so QUIT costs the unlinks and the index, as before."""
    await deliver(maildir_store, 4)
    await seen(maildir_store, MailboxView())  # the first login notes the device
    before = state_file(maildir_store).stat()
    replaced: list[str] = []
    real_replace = os.replace

    def spy(source: Any, target: Any, **kwargs: Any) -> None:
        replaced.append(os.fspath(target))
        real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    maildrop = await maildir_store.open_maildrop("alice")
    await maildrop.commit_deletions([0, 3])
    assert [Path(path).name for path in replaced] == [INDEX_NAME]
    assert state_file(maildir_store).stat().st_ino == before.st_ino
    assert len(await seen(maildir_store, MailboxView())) == 2


async def test_a_login_is_noted_at_most_hourly(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    await deliver(maildir_store, 1)
    await seen(maildir_store, PHONE)
    first = state_file(maildir_store).stat().st_ino
    await seen(maildir_store, PHONE)
    assert state_file(maildir_store).stat().st_ino == first  # a poll writes nothing
    clock.advance(seconds=3600)
    await seen(maildir_store, PHONE)
    assert state_file(maildir_store).stat().st_ino != first


async def test_a_warm_login_of_a_device_with_deletions_builds_nothing(
    maildir_store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its view (table and rendered listings) is kept with the index version, and
    the open runs on the event loop like a single device's poll."""
    await deliver(maildir_store, 6)
    await seen(maildir_store, LAPTOP)
    await quit_deleting(maildir_store, PHONE, [1, 2])
    first = await maildir_store.open_maildrop("alice", PHONE)
    table = first.messages
    assert len(table) == 4
    table.rendered["UIDL"] = b"rendered once"  # what proto.snapshot keeps there
    await first.release()
    hops: list[str] = []
    to_thread = asyncio.to_thread

    async def counting(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    again = await maildir_store.open_maildrop("alice", PHONE)
    assert again.messages is table
    await again.release()
    assert hops == []
    laptop = await maildir_store.open_maildrop("alice", LAPTOP)
    assert len(laptop.messages) == 6  # the laptop's view is the index's own
    await laptop.release()


async def test_a_state_another_process_wrote_is_read_again(tmp_path: Path) -> None:
    """Two worker processes, each with its cache: what one commits for a device the
    other's next login of that device sees, even with the index unchanged."""
    one, two = MaildirStore(tmp_path), MaildirStore(tmp_path)
    bodies = await deliver(one, 3)
    await seen(one, LAPTOP)
    assert await seen(two, PHONE) == bodies  # two caches the index and state now
    await quit_deleting(one, PHONE, [0])  # nothing removed: the laptop holds it
    assert await seen(two, PHONE) == bodies[1:]
    assert await seen(two, LAPTOP) == bodies


async def test_upkeep_leaves_a_held_folder_alone(maildir_store: MaildirStore) -> None:
    await deliver(maildir_store, 2)
    await deliver(maildir_store, 1, folder="Archive")
    await seen(maildir_store, MailboxView(folder="Archive", device="phone"))
    held = await maildir_store.open_maildrop("alice", PHONE)
    try:
        report = await maildir_store.sweep("alice", MailboxPolicy())
        assert report.busy == ["INBOX"]
        with pytest.raises(MaildropInUse):
            await maildir_store.forget_device("alice", "phone")
        # Read from the files while the session holds the folder.
        devices = await maildir_store.devices("alice")
        assert [(d.folder, d.device, d.pending) for d in devices] == [
            ("INBOX", "phone", 2),
            ("Archive", "phone", 1),
        ]
        assert await maildir_store.forget_device("alice", "laptop") == 0
    finally:
        await held.release()
    assert await maildir_store.forget_device("alice", "phone") == 2
    assert await maildir_store.devices("alice") == []


async def test_expire_zero_removes_what_a_session_retrieved_at_its_quit(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    """RFC 2449 EXPIRE 0: a message RETR sent whole goes at QUIT, for every device;
    one sent by a session that ended otherwise goes at the next QUIT or sweep."""
    policy = MailboxPolicy(retention_days=0)
    phone = MailboxView(device="phone", policy=policy)
    bodies = await deliver(maildir_store, 3)
    await seen(maildir_store, MailboxView(device="laptop", policy=policy))
    maildrop = await maildir_store.open_maildrop("alice", phone)
    maildrop.mark_retrieved(0)
    await maildrop.commit_deletions([])
    assert await seen(maildir_store, MailboxView(device="laptop", policy=policy)) == bodies[1:]
    dropped = await maildir_store.open_maildrop("alice", phone)
    dropped.mark_retrieved(0)
    await dropped.release()  # no QUIT: recorded, not removed
    assert len(await seen(maildir_store, MailboxView(device="laptop", policy=policy))) == 2
    clock.advance(days=1)
    assert (await maildir_store.sweep("alice", policy)).removed == 1
    assert await seen(maildir_store, MailboxView(device="laptop", policy=policy)) == bodies[2:]


async def test_a_sweep_of_folders_nobody_logged_in_to_writes_no_state(
    maildir_store: MaildirStore,
) -> None:
    await deliver(maildir_store, 2)
    await deliver(maildir_store, 1, folder="Archive")
    report = await maildir_store.sweep("alice", MailboxPolicy())
    assert (report.removed, report.moved, report.hidden) == (0, 0, 0)
    assert not state_file(maildir_store).exists()
    assert not state_file(maildir_store, "Archive").exists()
