"""What QUIT's +OK and a delivery's 250 stand on: the fsyncs after the changes.

A power cut cannot be staged in a test, so these record, around the real system
calls, every unlink, link, rename and fsync the store makes, and check the order
the promises need: a delivered file and its entry in new/ fsynced before deliver()
returns; every deleted file's directory fsynced after its unlink and before
commit_deletions() returns. They also check what a crash that undoes unsynced
renames (new/ to cur/) would leave: every message, each with its UIDL. A move to
Trash and a device's state follow the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from popbox.store import MaildirStore
from popbox.store.mailbox import Disposition, MailboxPolicy, MailboxView
from popbox.store.maildir_state import STATE_NAME, STATE_TMP_NAME

Event = tuple[str, str]


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """(call, path) of each unlink/link/rename/replace/fsync, in order; fsync by fd."""
    events: list[Event] = []

    def path_of(arg: Any, dir_fd: int | None) -> str:
        if dir_fd is not None:
            return str(Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / arg)
        return os.fspath(arg)

    def spy(name: str, real: Callable[..., Any], target_arg: int) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            dir_fd = kwargs.get("dst_dir_fd" if target_arg else "dir_fd")
            events.append((name, path_of(args[target_arg], dir_fd)))
            return result

        return wrapper

    def fsync(fd: int) -> None:
        os_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    os_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", spy("unlink", os.unlink, 0))
    monkeypatch.setattr(os, "link", spy("link", os.link, 1))
    monkeypatch.setattr(os, "rename", spy("rename", os.rename, 1))
    monkeypatch.setattr(os, "replace", spy("replace", os.replace, 1))
    return events


def synced_after(events: list[Event], change: int, path: str) -> bool:
    """Whether ``path`` was fsynced after event number ``change``."""
    return ("fsync", path) in events[change + 1 :]


async def test_a_delivery_is_on_disk_with_its_directory_entry_when_deliver_returns(
    tmp_path: Path, syscalls: list[Event]
) -> None:
    store = MaildirStore(tmp_path, save_crlf=True)
    name = await store.deliver("alice", b"Subject: hi\n\nbody\n")
    new = store.maildir("alice") / "new"
    linked = syscalls.index(("link", str(new / name)))
    tmp_file = str(store.maildir("alice") / "tmp" / name.partition(",")[0])
    # The data before the name points at it, the name before the 250.
    assert ("fsync", tmp_file) in syscalls[:linked]
    assert synced_after(syscalls, linked, str(new))
    assert (new / name).read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"


async def test_quit_makes_every_deletion_durable_before_it_returns(
    tmp_path: Path, syscalls: list[Event]
) -> None:
    store = MaildirStore(tmp_path)
    for n in range(4):
        await store.deliver("alice", f"message {n}\n".encode())
    maildrop = await store.open_maildrop("alice")  # moves them all to cur/
    maildir = store.maildir("alice")
    cur_names = sorted(os.listdir(maildir / "cur"))
    # A MUA renames one (flags) and puts another back into new/ after the snapshot.
    os.rename(maildir / "cur" / cur_names[1], maildir / "cur" / (cur_names[1] + "T"))
    back_in_new = cur_names[2].partition(":")[0]
    os.rename(maildir / "cur" / cur_names[2], maildir / "new" / back_in_new)
    syscalls.clear()
    await maildrop.commit_deletions([0, 1, 2])
    unlinked = [(i, path) for i, (call, path) in enumerate(syscalls) if call == "unlink"]
    assert sorted(Path(path).name for _, path in unlinked) == sorted(
        [cur_names[0], cur_names[1] + "T", back_in_new]
    )
    for i, path in unlinked:
        assert synced_after(syscalls, i, str(Path(path).parent)), path
    reopened = await MaildirStore(tmp_path).open_maildrop("alice")
    assert len(reopened.messages) == 1
    await reopened.release()


async def test_a_crash_that_undoes_the_moves_to_cur_loses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    """The new/ to cur/ renames of a login are not fsynced on their own: undone by a
    crash (files back in new/, cur/ with its old mtime), the next login finds every
    message under the UIDL it had, and RETR reads each one."""
    store = MaildirStore(tmp_path)
    bodies = [f"message {n}\n".encode() for n in range(3)]
    for body in bodies:
        await store.deliver("alice", body)
    maildir = store.maildir("alice")
    cur_before = os.stat(maildir / "cur")
    first = await store.open_maildrop("alice")
    uidls = list(first.messages.uidls)
    await first.release()
    for name in os.listdir(maildir / "cur"):
        os.rename(maildir / "cur" / name, maildir / "new" / name.partition(":")[0])
    os.utime(maildir / "cur", ns=(cur_before.st_atime_ns, cur_before.st_mtime_ns))
    for fresh in (store, MaildirStore(tmp_path)):  # the same process and a new one
        maildrop = await fresh.open_maildrop("alice")
        assert list(maildrop.messages.uidls) == uidls
        read = []
        for index in range(len(bodies)):
            read.append(b"".join([chunk async for chunk in maildrop.read_message(index)]))
        assert sorted(read) == sorted(bodies)
        await maildrop.release()


async def test_a_move_to_trash_is_durable_in_both_folders_before_quit_returns(
    tmp_path: Path, syscalls: list[Event]
) -> None:
    """One rename per message, then the Trash's cur/ (the new names) and INBOX's cur/
    (the old ones gone) fsynced before commit_deletions() returns. The Trash itself
    was made durably: its directories fsynced, and the user's Maildir that holds it."""
    store = MaildirStore(tmp_path)
    for n in range(3):
        await store.deliver("alice", f"message {n}\n".encode())
    trashing = MailboxView(policy=MailboxPolicy(disposition=Disposition.TRASH))
    maildrop = await store.open_maildrop("alice", trashing)
    syscalls.clear()
    await maildrop.commit_deletions([0, 2])
    inbox, trash = store.maildir("alice"), store.maildir("alice", "Trash")
    moved = [i for i, (call, path) in enumerate(syscalls) if call == "rename"]
    assert [Path(syscalls[i][1]).parent for i in moved] == [trash / "cur"] * 2
    assert synced_after(syscalls, moved[-1], str(trash / "cur"))
    assert synced_after(syscalls, moved[-1], str(inbox / "cur"))
    assert ("fsync", str(trash)) in syscalls
    assert ("fsync", str(inbox)) in syscalls  # the entry .Trash in the user's Maildir
    # One device, its deletions gone with their messages: no state to write.
    assert not any(path.endswith(STATE_NAME) for _, path in syscalls)


async def test_a_deletion_other_devices_hold_back_is_durable_before_quit_returns(
    tmp_path: Path, syscalls: list[Event]
) -> None:
    """Nothing is removed (the laptop still wants the message), so what QUIT
    promises the phone is its state: written, fsynced, renamed, its directory fsynced."""
    store = MaildirStore(tmp_path)
    await store.deliver("alice", b"message\n")
    laptop = await store.open_maildrop("alice", MailboxView(device="laptop"))
    await laptop.release()
    phone = await store.open_maildrop("alice", MailboxView(device="phone"))
    syscalls.clear()
    await phone.commit_deletions([0])
    maildir = store.maildir("alice")
    replaced = syscalls.index(("replace", str(maildir / STATE_NAME)))
    assert ("fsync", str(maildir / STATE_TMP_NAME)) in syscalls[:replaced]
    assert synced_after(syscalls, replaced, str(maildir))
    assert not any(call in ("unlink", "rename") for call, _ in syscalls)
