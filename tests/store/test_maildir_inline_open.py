"""A poll that finds nothing new opens on the event loop; anything else must still be
seen, so the quick open may only ever decline, never answer from a stale index."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

from popbox.errors import MaildropInUse
from popbox.store import MaildirStore
from support.maildrop import read_all


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions the store sends to a worker thread."""
    hops: list[str] = []
    to_thread = asyncio.to_thread

    async def counting(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return hops


async def uidls(store: MaildirStore) -> list[str]:
    maildrop = await store.open_maildrop("alice")
    result = list(maildrop.messages.uidls)
    await maildrop.release()
    return result


async def test_a_poll_that_finds_nothing_new_needs_no_worker_thread(
    maildir_store: MaildirStore, thread_hops: list[str]
) -> None:
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    first = await uidls(maildir_store)
    thread_hops.clear()
    maildrop = await maildir_store.open_maildrop("alice")
    assert list(maildrop.messages.uidls) == first
    assert await read_all(maildrop, 2) == b"message 2\n"
    await maildrop.commit_deletions([])
    assert await uidls(maildir_store) == first
    assert "_open_sync" not in thread_hops


async def test_arrivals_and_foreign_changes_are_seen_after_quick_opens(
    maildir_store: MaildirStore, thread_hops: list[str]
) -> None:
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    first = await uidls(maildir_store)
    await uidls(maildir_store)  # a quick one
    await maildir_store.deliver("alice", b"late\n")
    thread_hops.clear()
    with_late = await uidls(maildir_store)
    assert with_late[:3] == first
    assert len(with_late) == 4
    assert "_open_sync" in thread_hops  # new/ had news: the worker thread indexed it
    # Another program deletes a message in cur/ behind this process's back.
    cur = maildir_store.maildir("alice") / "cur"
    os.unlink(cur / sorted(os.listdir(cur))[0])
    assert await uidls(maildir_store) == with_late[1:]


async def test_a_held_maildrop_is_still_refused(maildir_store: MaildirStore) -> None:
    await maildir_store.deliver("alice", b"one\n")
    await uidls(maildir_store)
    held = await maildir_store.open_maildrop("alice")
    with pytest.raises(MaildropInUse):
        await maildir_store.open_maildrop("alice")
    await held.release()
    assert len(await uidls(maildir_store)) == 1


async def test_a_big_new_directory_is_listed_by_a_worker_thread(
    maildir_store: MaildirStore, thread_hops: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await maildir_store.deliver("alice", b"one\n")
    first = await uidls(maildir_store)
    monkeypatch.setattr("popbox.store.maildir.INLINE_OPEN_MAX_NEW_BYTES", 0)
    thread_hops.clear()
    assert await uidls(maildir_store) == first
    assert "_open_sync" in thread_hops


async def test_a_removed_maildir_is_made_again(maildir_store: MaildirStore) -> None:
    await maildir_store.deliver("alice", b"one\n")
    await uidls(maildir_store)
    maildir = maildir_store.maildir("alice")
    for sub in ("cur", "new", "tmp"):
        for name in os.listdir(maildir / sub):
            os.unlink(maildir / sub / name)
        os.rmdir(maildir / sub)
    for name in os.listdir(maildir):
        os.unlink(maildir / name)
    assert await uidls(maildir_store) == []


async def test_the_paths_kept_per_user_stay_bounded_and_right(tmp_path: Any) -> None:
    """Many users' logins keep at most MAX_LAYOUTS users' paths, and a user whose
    paths were forgotten still opens its own Maildir."""
    from popbox.store.maildir import MAX_LAYOUTS

    store = MaildirStore(tmp_path)
    users = [f"user{i}" for i in range(MAX_LAYOUTS + 10)]
    for user in users:
        await store.deliver(user, f"Subject: {user}\r\n\r\nfor {user}\r\n".encode())
        maildrop = await store.open_maildrop(user)
        await maildrop.release()
        assert store.mailboxes.layouts_kept() <= MAX_LAYOUTS
    assert store.maildir(users[0]) == tmp_path / users[0]
    maildrop = await store.open_maildrop(users[0])
    try:
        body = await read_all(maildrop, 0)
    finally:
        await maildrop.release()
    assert b"for user0" in body
