"""Kept UIDLs in the Maildir store: ``popbox.uidls`` beside the index, rebuilds, renames by
other software, compaction, ``adopt_uidls`` on a tree another server left, and deliveries
racing sessions (store/maildir_uidls.py has the rule)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from popbox.errors import MaildropInUse, NoSuchFolder
from popbox.store import MaildirStore
from popbox.store.index_cache import IndexCache
from popbox.store.index_file import INDEX_NAME, read_index
from popbox.store.mailbox import AdoptReport, MailboxView
from popbox.store.maildir_uidls import UIDLS_NAME, read_uidls
from support.clock import FakeClock
from support.maildrop import read_all

DOVECOT = "00002b5a5804f9c1"
OTHER = "UID42-1394811722"


def message(n: int) -> bytes:
    return f"Subject: {n}\n\nmessage {n}\n".encode()


async def seen(store: MaildirStore, user: str = "alice") -> list[tuple[int, str]]:
    """(message n, UIDL) of every message a login sees, in message-number order."""
    maildrop = await store.open_maildrop(user)
    try:
        out = []
        for index, info in enumerate(maildrop.messages):
            body = await read_all(maildrop, index)
            out.append((int(body.rsplit(b" ", 1)[1]), info.uidl))
        return out
    finally:
        await maildrop.release()


def sidecar(store: MaildirStore, user: str = "alice") -> str:
    path = store.maildir(user) / UIDLS_NAME
    return path.read_text() if path.exists() else ""


async def test_the_sidecar_holds_key_tab_uidl_for_each_kept_uidl(
    maildir_store: MaildirStore,
) -> None:
    name = await maildir_store.deliver("alice", message(1), uidl=DOVECOT)
    await maildir_store.deliver("alice", message(2))
    assert sidecar(maildir_store) == f"{name}\t{DOVECOT}\n"
    # Only before the first session: the name in new/ is the key.
    assert (maildir_store.maildir("alice") / "new" / name).exists()


async def test_a_rebuilt_index_keeps_the_kept_uidls_and_changes_popbox_own(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    await maildir_store.deliver("alice", message(1), uidl=DOVECOT)
    await maildir_store.deliver("alice", message(2))
    before = await seen(maildir_store)
    (maildir_store.maildir("alice") / INDEX_NAME).unlink()
    after = await seen(MaildirStore(maildir_store.root, clock=clock))
    assert before[0] == after[0] == (1, DOVECOT)
    assert before[1][1] != after[1][1]  # the rebuild's new UIDVALIDITY


async def test_flag_renames_by_other_software_keep_the_uidl(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    name = await maildir_store.deliver("alice", message(1), uidl=DOVECOT)
    maildir = maildir_store.maildir("alice")
    # A MUA moved it to cur/ and flagged it before popbox's first session.
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")
    assert await seen(maildir_store) == [(1, DOVECOT)]
    os.rename(maildir / "cur" / f"{name}:2,S", maildir / "cur" / f"{name}:2,RST")
    assert await seen(MaildirStore(maildir_store.root, clock=clock)) == [(1, DOVECOT)]
    assert await seen(maildir_store) == [(1, DOVECOT)]


async def test_removals_drop_the_lines_of_gone_messages_and_only_those(
    maildir_store: MaildirStore,
) -> None:
    names = [await maildir_store.deliver("alice", message(n), uidl=f"K{n}") for n in range(3)]
    maildir = maildir_store.maildir("alice")
    # A line whose delivery died before the link (no file anywhere), and one whose
    # message was deleted by other software.
    stale = "1700000000.M1P1Q1Rdead.host,S=1,W=1"
    with (maildir / UIDLS_NAME).open("a") as file:
        file.write(f"{stale}\tSTALE\n")
    assert await seen(maildir_store) == [(0, "K0"), (1, "K1"), (2, "K2")]
    (maildir / "cur" / f"{names[2]}:2,").unlink()
    maildrop = await maildir_store.open_maildrop("alice")
    await maildrop.commit_deletions([0])
    assert sidecar(maildir_store) == f"{names[1]}\tK1\n"
    maildrop = await maildir_store.open_maildrop("alice")
    await maildrop.commit_deletions([0])
    assert not (maildir / UIDLS_NAME).exists()


async def test_a_line_of_a_delivery_under_way_survives_a_compaction(
    maildir_store: MaildirStore,
) -> None:
    name = await maildir_store.deliver("alice", message(1), uidl="K1")
    maildir = maildir_store.maildir("alice")
    await seen(maildir_store)
    # Mid-delivery: written to tmp/ and its line appended, not linked into new/ yet.
    pending = "1700000000.M2P2Q2Rbusy.host"
    (maildir / "tmp" / pending).write_bytes(message(2))
    with (maildir / UIDLS_NAME).open("a") as file:
        file.write(f"{pending},S=21,W=22\tK2\n")
    maildrop = await maildir_store.open_maildrop("alice")
    await maildrop.commit_deletions([0])
    assert name not in sidecar(maildir_store)
    assert sidecar(maildir_store) == f"{pending},S=21,W=22\tK2\n"
    os.link(maildir / "tmp" / pending, maildir / "new" / f"{pending},S=21,W=22")
    (maildir / "tmp" / pending).unlink()
    assert await seen(maildir_store) == [(2, "K2")]


async def test_a_torn_or_foreign_line_is_ignored(maildir_store: MaildirStore) -> None:
    await maildir_store.deliver("alice", message(1), uidl="K1")
    other = await maildir_store.deliver("alice", message(2))
    with (maildir_store.maildir("alice") / UIDLS_NAME).open("a") as file:
        file.write("no tab here\n\tK9\nkey\thas space\n")
        file.write(f"{other}\tTORN")  # a crash mid-append: no LF
    uidls = [uidl for _, uidl in await seen(maildir_store)]
    assert uidls[0] == "K1"
    assert uidls[1] != "TORN"


async def test_a_uidl_in_popbox_own_form_yet_to_come_is_not_served(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    await maildir_store.deliver("alice", message(1))
    await seen(maildir_store)
    index = read_index(maildir_store.maildir("alice"))
    assert index is not None
    # The own UIDL of the message after next: served or not, it belongs to that UID.
    future = f"{index.uidvalidity:08x}{index.next_uid + 1:08x}"
    await maildir_store.deliver("alice", message(2), uidl=future)
    first = await seen(maildir_store)
    assert first[1][1] != future
    await maildir_store.deliver("alice", message(3))
    after = await seen(MaildirStore(maildir_store.root, clock=clock))
    assert after[:2] == first
    assert after[2] == (3, future)
    assert sidecar(maildir_store) == ""  # the losing line went at once


async def test_another_worker_sees_a_delivery_with_a_kept_uidl(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    other = MaildirStore(maildir_store.root, clock=clock)
    await maildir_store.deliver("alice", message(1))
    assert len(await seen(maildir_store)) == 1  # cached by this worker
    await other.deliver("alice", message(2), uidl=DOVECOT)
    assert (await seen(maildir_store))[1] == (2, DOVECOT)


# -- adopt_uidls: a tree another server left ---------------------------------------------


def dovecot_tree(maildir: Path, count: int) -> list[str]:
    """Messages as Dovecot leaves them (cur/ with flags, new/ unseen); their keys, in
    the order Dovecot numbered them (not the order of their names)."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    keys = []
    for n in range(count):
        body = message(n).replace(b"\n", b"\r\n")
        key = f"{1700000000 + (7 * n) % count}.M{n}P99.oldhost,S={len(body)},W={len(body)}"
        sub, info = ("new", "") if n == count - 1 else ("cur", ":2,S")
        (maildir / sub / f"{key}{info}").write_bytes(body)
        keys.append(key)
    return keys


async def test_adopted_uidls_are_served_in_the_old_order_and_a_second_run_changes_nothing(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    keys = dovecot_tree(maildir_store.maildir("alice"), 5)
    uidls = {key: f"{n:08X}5804f9c1" for n, key in enumerate(keys)}
    report = await maildir_store.adopt_uidls("alice", uidls, order=keys)
    assert report == AdoptReport(adopted=tuple(keys), ordered=True)
    expected = [(n, f"{n:08X}5804f9c1") for n in range(5)]
    assert await seen(maildir_store) == expected
    assert await seen(MaildirStore(maildir_store.root, clock=clock)) == expected
    index_file = maildir_store.maildir("alice") / INDEX_NAME
    before = (sidecar(maildir_store), index_file.stat().st_ino)
    report = await maildir_store.adopt_uidls("alice", uidls, order=keys)
    assert report == AdoptReport(already=tuple(keys))
    assert (sidecar(maildir_store), index_file.stat().st_ino) == before


async def test_adopt_reports_missing_and_invalid_keys(maildir_store: MaildirStore) -> None:
    keys = dovecot_tree(maildir_store.maildir("alice"), 4)
    report = await maildir_store.adopt_uidls(
        "alice",
        {
            keys[0]: "A",
            "1700000000.gone.host": "B",
            keys[1]: "has space",
            keys[2]: "A",  # a UIDL the mapping gives twice: served once
        },
    )
    assert report.adopted == (keys[0],)
    assert report.missing == ("1700000000.gone.host",)
    assert set(report.invalid) == {keys[1], keys[2]}
    assert report.counts == {"adopted": 1, "already": 0, "missing": 1, "invalid": 2}
    assert not report.ordered
    # A message keeps the UIDL it was given: another one is refused.
    again = await maildir_store.adopt_uidls("alice", {keys[0]: "C", keys[3]: "D"})
    assert again.invalid == (keys[0],)
    assert again.adopted == (keys[3],)
    uidls = dict(await seen(maildir_store))
    assert uidls[0] == "A"
    assert uidls[3] == "D"


async def test_order_applies_only_to_a_first_index(maildir_store: MaildirStore) -> None:
    keys = dovecot_tree(maildir_store.maildir("alice"), 4)
    numbered = [n for n, _ in await seen(maildir_store)]  # popbox numbered by name
    report = await maildir_store.adopt_uidls("alice", {keys[0]: "A"}, order=keys)
    assert not report.ordered
    assert [n for n, _ in await seen(maildir_store)] == numbered


async def test_adopt_waits_for_no_session_it_refuses_while_one_holds_the_folder(
    maildir_store: MaildirStore,
) -> None:
    keys = dovecot_tree(maildir_store.maildir("alice"), 2)
    maildrop = await maildir_store.open_maildrop("alice")
    with pytest.raises(MaildropInUse):
        await maildir_store.adopt_uidls("alice", {keys[0]: "A"})
    await maildrop.release()
    with pytest.raises(NoSuchFolder):
        await maildir_store.adopt_uidls("alice", {keys[0]: "A"}, folder="Nowhere")
    assert (await maildir_store.adopt_uidls("alice", {keys[0]: "A"})).adopted == (keys[0],)


async def test_every_worker_serves_what_another_adopted(tmp_path: Path, clock: FakeClock) -> None:
    serving = MaildirStore(tmp_path / "mail", clock=clock, index_cache=IndexCache())
    keys = dovecot_tree(serving.maildir("alice"), 3)
    before = await seen(serving)  # this worker caches the index and its snapshot
    adopting = MaildirStore(tmp_path / "mail", clock=clock)
    await adopting.adopt_uidls("alice", {keys[1]: "B"})
    after = await seen(serving)
    assert [uidl for _, uidl in after] == [before[0][1], "B", before[2][1]]
    phone = await serving.open_maildrop("alice", MailboxView(device="phone"))
    assert [info.uidl for info in phone.messages][1] == "B"
    await phone.release()


# -- deliveries racing sessions --------------------------------------------------------


async def test_deliveries_with_kept_uidls_racing_removals_lose_none(
    maildir_store: MaildirStore, clock: FakeClock
) -> None:
    """Lockless deliveries append while sessions compact the file: every delivered
    message still serves its UIDL (the flock and the check of the file's inode)."""
    count = 120
    done = threading.Event()

    def deliver_all() -> None:
        store = MaildirStore(maildir_store.root, clock=clock)
        for n in range(count):
            asyncio.run(store.deliver("alice", message(n), uidl=f"K{n}"))
        done.set()

    thread = threading.Thread(target=deliver_all)
    thread.start()
    try:
        while not done.is_set():
            # Each session deletes the oldest message: its line goes in a compaction.
            maildrop = await maildir_store.open_maildrop("alice")
            for index, info in enumerate(maildrop.messages):
                body = await read_all(maildrop, index)
                assert info.uidl == f"K{int(body.rsplit(b' ', 1)[1])}"
            await maildrop.commit_deletions([0] if len(maildrop.messages) > 1 else [])
    finally:
        thread.join()
    final = await seen(MaildirStore(maildir_store.root, clock=clock))
    assert final
    assert all(uidl == f"K{n}" for n, uidl in final)
    journal = read_uidls(maildir_store.maildir("alice"))
    assert journal is not None
    assert set(journal.uidls.values()) == {uidl for _, uidl in final}
