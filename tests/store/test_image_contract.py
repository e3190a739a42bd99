"""The folder-image contract (store.image): a folder moved between two stores is the same
folder for every client and device.

Each test runs for every (source, target) pair of stores that can be moved out of and
into: the same UIDLs, message numbers, sizes and bodies in every view, the same device
state (deletions, retrievals, LOGIN-DELAY, Trash age), a restore that resumes and
removes what the image lacks, and sessions refused with [IN-USE] while a folder is read
or written. The crash test (a kill -9 at every step of a Maildir restore) is below it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from popbox.errors import LoginTooSoon, MaildropInUse, NoSuchFolder
from popbox.store.image import FolderImage, ImageStore, own_uidl
from popbox.store.mailbox import INBOX, TRASH, Disposition, MailboxPolicy, MailboxView
from popbox.store.maildir import MaildirStore
from support.clock import FakeClock
from support.crash import kill_before_call, run_until_killed
from support.maildrop import read_all

# The stores that are sources and targets of a move; PostgreSQL joins once it exists.
KINDS = ["maildir"]
if importlib.util.find_spec("popbox.store.postgresql") is not None:
    KINDS.append("postgresql")
PAIRS = [(source, target) for source in KINDS for target in KINDS]

USER = "alice"
PHONE = "phone"


async def make_store(
    kind: str, request: pytest.FixtureRequest, path: Path, clock: FakeClock
) -> Any:
    """A fresh store of ``kind``; PostgreSQL on a database of its own."""
    if kind == "maildir":
        return MaildirStore(path, clock=clock)
    from support.pgstore import postgres_store

    dsn = request.getfixturevalue("postgres_server").create_database()
    return postgres_store(dsn, clock)


@dataclass
class Pair:
    source: Any
    target: Any


@pytest.fixture(params=PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
async def pair(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Pair]:
    source_kind, target_kind = request.param
    source = await make_store(source_kind, request, tmp_path / "source", clock)
    target = await make_store(target_kind, request, tmp_path / "target", clock)
    yield Pair(source, target)
    await source.close()
    await target.close()


async def move(source: ImageStore, target: ImageStore, user: str, folder: str) -> FolderImage:
    """One folder from ``source`` to ``target`` (popbox migrate's copy step)."""
    held = await source.open_image(user, folder)
    try:
        await target.restore_image(held.image, held.read)
        return held.image
    finally:
        await held.close()


async def move_all(pair: Pair, user: str = USER) -> None:
    for folder in await pair.source.folders(user):
        await move(pair.source, pair.target, user, folder)


def message(n: int, size: int = 40) -> bytes:
    return f"Subject: {n}\r\nMessage-ID: <{n}@test>\r\n\r\n".encode() + b"x" * size + b"\r\n"


async def look(store: Any, view: MailboxView, *, commit: tuple[int, ...] = ()) -> list[tuple]:
    """What a login with ``view`` sees: (number, UIDL, size, body); then QUIT,
    deleting ``commit`` (0-based) and retrieving the first message."""
    drop = await store.open_maildrop(USER, view)
    try:
        seen = [
            (n + 1, info.uidl, info.size, await read_all(drop, n))
            for n, info in enumerate(drop.messages)
        ]
        if seen:
            drop.mark_retrieved(0)
        await drop.commit_deletions(commit)
        return seen
    except BaseException:
        await drop.release()
        raise


async def fill(store: Any, clock: FakeClock) -> None:
    """A mailbox with a bit of everything: kept UIDLs, two folders, a device with
    deletions and retrievals, Trash of two ages."""
    for n in range(1, 6):
        await store.deliver(USER, message(n), uidl=f"old-{n}" if n % 2 else None)
        clock.advance(days=1)
    await store.deliver(USER, message(10), folder="lists")
    keep = MailboxPolicy(disposition=Disposition.TRASH)
    await look(store, MailboxView(device=PHONE, policy=keep), commit=(1,))
    await look(store, MailboxView(policy=keep), commit=(1, 2))  # both devices: to Trash
    clock.advance(days=20)
    await store.deliver(USER, message(20))


async def everything(store: Any) -> dict[str, Any]:
    """Every view a client or device has, and the devices' reports, without changing
    anything a later look depends on (inspecting views)."""
    seen: dict[str, Any] = {"folders": await store.folders(USER)}
    for folder in seen["folders"]:
        drop = await store.open_maildrop(USER, MailboxView(folder, inspect=True))
        try:
            seen[folder] = [
                (info.uidl, info.size, await read_all(drop, n))
                for n, info in enumerate(drop.messages)
            ]
        finally:
            await drop.release()
    seen["devices"] = sorted(
        (r.folder, r.device, r.last_login, r.last_hold, r.pending, r.deleted)
        for r in await store.devices(USER)
    )
    seen["usage"] = await store.usage(USER)
    return seen


async def test_a_moved_mailbox_is_the_same_for_every_client_and_device(
    pair: Pair, clock: FakeClock
) -> None:
    await fill(pair.source, clock)
    before = await everything(pair.source)
    await move_all(pair)
    assert await everything(pair.target) == before
    # Each device's own login: the same numbers, UIDLs, sizes and bodies.
    for view in (MailboxView(), MailboxView(device=PHONE), MailboxView(recent=True)):
        assert await look(pair.target, view) == await look(pair.source, view)
    assert await look(pair.target, MailboxView("lists")) == await look(
        pair.source, MailboxView("lists")
    )


async def test_uidls_are_kept_or_the_stores_own_form(pair: Pair, clock: FakeClock) -> None:
    await fill(pair.source, clock)
    image = await move(pair.source, pair.target, USER, INBOX)
    drop = await pair.target.open_maildrop(USER, MailboxView(inspect=True))
    await drop.release()
    served = [info.uidl for info in drop.messages]
    wanted = [m.kept_uidl or own_uidl(image.uidvalidity, m.uid) for m in image.messages]
    assert served == wanted
    assert "old-1" in served


async def test_login_delay_and_trash_age_carry_over(pair: Pair, clock: FakeClock) -> None:
    await fill(pair.source, clock)
    delayed = MailboxView(device=PHONE, policy=MailboxPolicy(login_delay=3600))
    await look(pair.source, delayed)
    await move_all(pair)
    with pytest.raises(LoginTooSoon):
        await pair.target.open_maildrop(USER, delayed)
    # Trash: the two messages moved there 20 days ago go after 30 days, in both.
    clock.advance(days=11)
    policy = MailboxPolicy(trash_days=30)
    source_sweep = await pair.source.sweep(USER, policy)
    target_sweep = await pair.target.sweep(USER, policy)
    assert target_sweep.removed == source_sweep.removed > 0
    assert await everything(pair.target) == await everything(pair.source)


async def test_a_restore_again_copies_nothing_and_removes_what_the_image_lacks(
    pair: Pair, clock: FakeClock
) -> None:
    await fill(pair.source, clock)
    held = await pair.source.open_image(USER, INBOX)
    try:
        first = await pair.target.restore_image(held.image, held.read)
        again = await pair.target.restore_image(held.image, held.read)
        image = held.image
    finally:
        await held.close()
    assert first.copied == len(image.messages)
    assert first.skipped == 0
    assert again.copied == 0
    assert again.skipped == len(image.messages)
    # A smaller image of the same folder: the target follows it.
    smaller = FolderImage(
        image.user, image.folder, image.uidvalidity, image.next_uid, image.messages[1:], image.state
    )
    held = await pair.source.open_image(USER, INBOX)
    try:
        report = await pair.target.restore_image(smaller, held.read)
    finally:
        await held.close()
    assert report.removed == 1
    assert report.copied == 0
    drop = await pair.target.open_maildrop(USER, MailboxView(inspect=True))
    await drop.release()
    assert len(drop.messages) == len(image.messages) - 1


async def test_sessions_get_in_use_while_a_folder_is_read_or_restored(
    pair: Pair, clock: FakeClock
) -> None:
    await pair.source.deliver(USER, message(1))
    held = await pair.source.open_image(USER, INBOX)
    try:
        with pytest.raises(MaildropInUse):
            await pair.source.open_maildrop(USER)
        reading = asyncio.Event()
        go_on = asyncio.Event()

        async def slow_read(uid: int) -> AsyncIterator[bytes]:
            reading.set()
            await go_on.wait()
            async for chunk in held.read(uid):
                yield chunk

        restoring = asyncio.create_task(pair.target.restore_image(held.image, slow_read))
        await reading.wait()
        with pytest.raises(MaildropInUse):
            await pair.target.open_maildrop(USER)
        go_on.set()
        await restoring
    finally:
        await held.close()
    drop = await pair.target.open_maildrop(USER)
    await drop.release()
    assert len(drop.messages) == 1


async def test_remove_folder_and_missing_folders(pair: Pair, clock: FakeClock) -> None:
    await fill(pair.source, clock)
    with pytest.raises(NoSuchFolder):
        await pair.source.open_image(USER, "nothing")
    await pair.source.remove_folder(USER, "lists")
    assert "lists" not in await pair.source.folders(USER)
    await pair.source.remove_folder(USER, "lists")  # once more: nothing to do
    assert TRASH in await pair.source.folders(USER)


# -- a Maildir restore killed at every step, then resumed ---------------------------------

_CHILD = """
import asyncio, json, sys
from pathlib import Path
from popbox.store.maildir import MaildirStore

async def main():
    source = MaildirStore(Path(sys.argv[1]) / "source")
    target = MaildirStore(Path(sys.argv[1]) / "target")
    held = await source.open_image("alice", sys.argv[3])
    try:
        await target.restore_image(held.image, held.read)
    finally:
        await held.close()

asyncio.run(main())
print(calls)
"""


async def test_a_maildir_restore_killed_at_any_step_resumes_to_the_same_folder(
    tmp_path: Path, clock: FakeClock
) -> None:
    source = MaildirStore(tmp_path / "source", clock=clock)
    await fill(source, clock)
    before = await everything(source)
    code = kill_before_call("link", "rename", "unlink", "fsync", "replace", "write") + _CHILD
    steps = int(run_until_killed(code, str(tmp_path), "-1", INBOX).strip())
    assert steps > 10
    # The complete restore is the reference; then each kill point from a fresh target.
    reference = await everything(MaildirStore(tmp_path / "target", clock=clock))
    assert reference["INBOX"] == before["INBOX"]
    for kill_at in range(0, steps, max(1, steps // 12)):
        target_dir = tmp_path / "target"
        _remove_tree(target_dir)
        run_until_killed(code, str(tmp_path), str(kill_at), INBOX)
        resumed = MaildirStore(target_dir, clock=clock)
        await move(source, resumed, USER, INBOX)
        assert (await everything(resumed))["INBOX"] == reference["INBOX"], kill_at
        assert json.dumps(await _devices(resumed)) == json.dumps(await _devices(source))


async def _devices(store: MaildirStore) -> list[Any]:
    return sorted(
        (r.device, r.last_login, r.pending, r.deleted)
        for r in await store.devices(USER)
        if r.folder == INBOX
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
