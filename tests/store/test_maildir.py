"""MaildirStore beyond the contract: the on-disk layout other mail software shares.

Files here are written the way Postfix, Dovecot, getmail and mutt write them, then
read through the store, and the other way round.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from popbox.errors import PermanentStoreError, StoreError
from popbox.store import MaildirStore, Usage
from popbox.store.index_cache import IndexCache
from popbox.store.index_file import INDEX_NAME, read_index
from popbox.wireform import wire_size
from support.maildrop import message_files, read_all

DOVECOT_NAME = "1700000001.M20P30.mail.example,S={s},W={w}:2,S"
POSTFIX_NAME = "1700000002.V801I2345M678.mail.example"
GETMAIL_NAME = "1700000003.4567.mail.example"
MUTT_NAME = "1700000004.R12345.mutt-host:2,RS"


def drop(maildir: Path, sub: str, name: str, body: bytes) -> Path:
    """Put a message into the Maildir the way other software would (tmp, then rename)."""
    for part in ("cur", "new", "tmp"):
        (maildir / part).mkdir(parents=True, exist_ok=True)
    tmp = maildir / "tmp" / name
    tmp.write_bytes(body)
    target = maildir / sub / name
    tmp.rename(target)
    return target


async def uidls(store: MaildirStore, user: str) -> list[str]:
    maildrop = await store.open_maildrop(user)
    result = [info.uidl for info in maildrop.messages]
    await maildrop.release()
    return result


async def test_delivery_layout_and_modes(maildir_store: MaildirStore) -> None:
    message = b"Subject: hi\n\nbody\n"
    key = await maildir_store.deliver("alice", message)
    maildir = maildir_store.maildir("alice")
    for part in ("cur", "new", "tmp"):
        assert stat.S_IMODE((maildir / part).stat().st_mode) == 0o700
    assert list((maildir / "tmp").iterdir()) == []
    (path,) = (maildir / "new").iterdir()
    assert path.name == key
    assert key.endswith(f",S={len(message)},W={wire_size(message)}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == message


@pytest.mark.parametrize("user", ["", ".", "..", "../evil", "a/b", ".hidden", "nul\x00", "x" * 300])
async def test_user_names_that_escape_the_root_are_refused(
    maildir_store: MaildirStore, tmp_path: Path, user: str
) -> None:
    with pytest.raises(PermanentStoreError):
        await maildir_store.deliver(user, b"x\n")
    with pytest.raises(PermanentStoreError):
        await maildir_store.open_maildrop(user)
    with pytest.raises(PermanentStoreError):
        await maildir_store.usage(user)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_foreign_messages_appear_with_their_sizes(maildir_store: MaildirStore) -> None:
    maildir = maildir_store.maildir("alice")
    dovecot_body = b"From: dovecot\n\nstored by Dovecot\n"
    bodies = {
        "cur": (
            DOVECOT_NAME.format(s=len(dovecot_body), w=wire_size(dovecot_body)),
            dovecot_body,
        ),
        "new": (POSTFIX_NAME, b"From: postfix\r\n\r\nno size fields, CRLF\r\n"),
        "new2": (GETMAIL_NAME, b"From: getmail\n\nno final newline"),
        "cur2": (MUTT_NAME, b"From: mutt\n\nflags RS\n"),
    }
    for sub, (name, body) in bodies.items():
        drop(maildir, sub.rstrip("2"), name, body)
    # Other software's bookkeeping and half-written deliveries are not messages.
    (maildir / "cur" / ".mutt-lock").write_bytes(b"x")
    (maildir / "new" / ".hidden").write_bytes(b"x")
    (maildir / "tmp" / "1700000009.P1.in-progress").write_bytes(b"partial")
    (maildir / "cur" / "a-directory").mkdir()
    (maildir / "dovecot-uidlist").write_text("3 V1 N2\n")
    maildrop = await maildir_store.open_maildrop("alice")
    ordered = [bodies[k] for k in ("cur", "new", "new2", "cur2")]  # by delivery time
    assert [info.size for info in maildrop.messages] == [wire_size(b) for _, b in ordered]
    assert [await read_all(maildrop, i) for i in range(4)] == [b for _, b in ordered]
    await maildrop.release()
    assert await maildir_store.usage("alice") == Usage(4, sum(wire_size(b) for _, b in ordered))


async def test_sizes_come_from_w_fields_and_the_index_not_bodies(
    maildir_store: MaildirStore,
) -> None:
    """STAT/LIST never open an indexed body: a body changed behind our back is not seen."""
    maildir = maildir_store.maildir("alice")
    drop(maildir, "new", "1700000001.M1P1.host,S=5,W=777", b"tiny\n")
    drop(maildir, "new", POSTFIX_NAME, b"read once\n")
    assert await uidls(maildir_store, "alice") != []
    maildrop = await maildir_store.open_maildrop("alice")
    assert [info.size for info in maildrop.messages] == [777, 11]
    await maildrop.release()
    for path in (maildir / "cur").iterdir():
        path.write_bytes(b"a much longer body than before\n" * 10)
    maildrop = await maildir_store.open_maildrop("alice")
    assert [info.size for info in maildrop.messages] == [777, 11]
    await maildrop.release()


async def test_new_mail_moves_to_cur_and_keeps_its_uidl(maildir_store: MaildirStore) -> None:
    key = await maildir_store.deliver("alice", b"one\n")
    drop(maildir_store.maildir("alice"), "new", POSTFIX_NAME, b"two\n")
    first = await uidls(maildir_store, "alice")
    maildir = maildir_store.maildir("alice")
    assert list((maildir / "new").iterdir()) == []
    names = sorted(path.name for path in (maildir / "cur").iterdir())
    assert names == sorted([POSTFIX_NAME + ":2,", key + ":2,"])
    assert await uidls(maildir_store, "alice") == first


async def test_flag_renames_between_sessions_keep_uidls(maildir_store: MaildirStore) -> None:
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    before = await uidls(maildir_store, "alice")
    maildir = maildir_store.maildir("alice")
    for path in (maildir / "cur").iterdir():  # a MUA marks everything seen and replied
        path.rename(path.with_name(path.name.split(":")[0] + ":2,RS"))
    # ...and one message is moved back to new/ by something that knows no better.
    moved = next(iter((maildir / "cur").iterdir()))
    moved.rename(maildir / "new" / moved.name.split(":")[0])
    assert await uidls(maildir_store, "alice") == before


async def test_renames_during_a_session_are_followed(maildir_store: MaildirStore) -> None:
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    await uidls(maildir_store, "alice")  # index and move to cur/
    maildrop = await maildir_store.open_maildrop("alice")
    maildir = maildir_store.maildir("alice")
    for path in (maildir / "cur").iterdir():
        path.rename(path.with_name(path.name + "S"))
    assert await read_all(maildrop, 1) == b"message 1\n"
    await maildrop.commit_deletions([0, 2])
    assert [path.read_bytes() for path in message_files(maildir)] == [b"message 1\n"]


async def test_index_survives_a_restart(maildir_store: MaildirStore) -> None:
    for n in range(5):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    before = await uidls(maildir_store, "alice")
    restarted = MaildirStore(maildir_store.root)
    assert await uidls(restarted, "alice") == before


async def test_foreign_deletions_and_arrivals_between_sessions(
    maildir_store: MaildirStore,
) -> None:
    for n in range(4):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    before = await uidls(maildir_store, "alice")
    maildir = maildir_store.maildir("alice")
    message_files(maildir)[1].unlink()  # mutt deleted one
    drop(maildir, "new", "1999999999.V1I2M3.host", b"late\n")
    after = await uidls(maildir_store, "alice")
    assert after[:3] == [before[0], before[2], before[3]]
    assert after[3] not in before


async def test_uidls_are_not_reused_after_deleting_the_newest(
    maildir_store: MaildirStore,
) -> None:
    seen: set[str] = set()
    for round_ in range(4):
        await maildir_store.deliver("alice", f"round {round_}\n".encode())
        maildrop = await maildir_store.open_maildrop("alice")
        (info,) = maildrop.messages
        assert info.uidl not in seen
        seen.add(info.uidl)
        await maildrop.commit_deletions([0])


async def test_warm_open_does_not_rewrite_the_index(maildir_store: MaildirStore) -> None:
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    await uidls(maildir_store, "alice")
    index = maildir_store.maildir("alice") / INDEX_NAME
    # Age cur/ so the index may trust its mtime, and let one open record that.
    old = time.time() - 60
    os.utime(index.parent / "cur", (old, old))
    await uidls(maildir_store, "alice")
    written = index.stat()
    await uidls(maildir_store, "alice")
    again = index.stat()
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


async def test_usage_without_a_session_sees_every_change(maildir_store: MaildirStore) -> None:
    """The quota check's fast path (index header + new/) must agree with a full count."""
    bodies = [f"message {n}\n".encode() * (n + 1) for n in range(4)]
    for body in bodies:
        await maildir_store.deliver("alice", body)
    await uidls(maildir_store, "alice")
    maildir = maildir_store.maildir("alice")
    old = time.time() - 60
    os.utime(maildir / "cur", (old, old))
    await uidls(maildir_store, "alice")  # index now trusts cur/'s mtime
    total = sum(wire_size(b) for b in bodies)
    assert await maildir_store.usage("alice") == Usage(4, total)
    await maildir_store.deliver("alice", b"new\n")
    assert await maildir_store.usage("alice") == Usage(5, total + 5)
    drop(maildir, "new", POSTFIX_NAME, b"crlf\r\n")  # no size fields: st_size
    assert await maildir_store.usage("alice") == Usage(6, total + 11)
    # A cur/ file deleted by other software.
    (victim,) = [p for p in (maildir / "cur").iterdir() if p.read_bytes() == bodies[-1]]
    victim.unlink()
    usage = await maildir_store.usage("alice")
    assert usage == Usage(5, total + 11 - wire_size(bodies[-1]))


async def test_duplicate_keys_count_once(maildir_store: MaildirStore) -> None:
    maildir = maildir_store.maildir("alice")
    drop(maildir, "cur", "1700000001.dup.host:2,S", b"seen copy\n")
    drop(maildir, "new", "1700000001.dup.host", b"stray copy\n")
    maildrop = await maildir_store.open_maildrop("alice")
    assert len(maildrop.messages) == 1
    assert await read_all(maildrop, 0) == b"seen copy\n"
    await maildrop.release()


async def test_stale_tmp_files_are_cleaned_at_login(maildir_store: MaildirStore) -> None:
    await maildir_store.deliver("alice", b"x\n")
    tmp = maildir_store.maildir("alice") / "tmp"
    stale = tmp / "1600000000.P1.crashed"
    fresh = tmp / "1700000000.P2.writing"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    long_ago = time.time() - 3 * 24 * 3600
    os.utime(stale, (long_ago, long_ago))
    await uidls(maildir_store, "alice")
    assert sorted(p.name for p in tmp.iterdir()) == [fresh.name]


async def test_read_of_a_vanished_message_is_a_store_error(
    maildir_store: MaildirStore,
) -> None:
    await maildir_store.deliver("alice", b"x\n")
    maildrop = await maildir_store.open_maildrop("alice")
    for path in message_files(maildir_store.maildir("alice")):
        path.unlink()
    with pytest.raises(StoreError):
        await read_all(maildrop, 0)
    # A message already gone is not a deletion failure.
    await maildrop.commit_deletions([0])


async def test_deliver_file_streams_a_large_message(
    maildir_store: MaildirStore, tmp_path: Path
) -> None:
    source = tmp_path / "big.eml"
    line = b"0123456789" * 7 + b"\n"
    with source.open("wb") as handle:
        for _ in range(100_000):  # 7.1 MB
            handle.write(line)
    with source.open("rb") as handle:
        key = await maildir_store.deliver_file("alice", handle)
    size = source.stat().st_size
    assert key.endswith(f",S={size},W={size + 100_000}")
    maildrop = await maildir_store.open_maildrop("alice")
    assert maildrop.messages[0].size == size + 100_000
    total = 0
    async for chunk in maildrop.read_message(0):
        assert len(chunk) <= 64 * 1024
        total += len(chunk)
    assert total == size
    await maildrop.release()


async def test_cancelled_open_does_not_leave_the_lock_held(
    maildir_store: MaildirStore,
) -> None:
    for n in range(50):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    task = asyncio.create_task(maildir_store.open_maildrop("alice"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the worker thread finishes, then gives the lock back
        try:
            maildrop = await maildir_store.open_maildrop("alice")
            break
        except StoreError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the lock of the cancelled open was never released")
    assert len(maildrop.messages) == 50
    await maildrop.release()


async def test_delivery_recreates_a_removed_maildir(maildir_store: MaildirStore) -> None:
    await maildir_store.deliver("alice", b"first\n")
    shutil.rmtree(maildir_store.maildir("alice"))
    await maildir_store.deliver("alice", b"second\n")
    maildrop = await maildir_store.open_maildrop("alice")
    assert [await read_all(maildrop, 0)] == [b"second\n"]
    await maildrop.release()


async def test_cached_index_notices_other_processes(maildir_store: MaildirStore) -> None:
    """A worker's cached index must not outlive a change made by another worker."""
    for n in range(4):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    before = await uidls(maildir_store, "alice")  # now cached in maildir_store
    other_worker = MaildirStore(maildir_store.root)
    maildrop = await other_worker.open_maildrop("alice")
    await maildrop.commit_deletions([1])
    await other_worker.deliver("alice", b"late\n")
    after = await uidls(maildir_store, "alice")
    assert after[:3] == [before[0], before[2], before[3]]
    assert after[3] not in before
    assert await uidls(other_worker, "alice") == after


async def test_symlinks_in_a_maildir_are_not_messages(
    maildir_store: MaildirStore, tmp_path: Path
) -> None:
    """A link planted in cur/ must not let a session read a file outside the Maildir."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"not mail\n")
    await maildir_store.deliver("alice", b"real\n")
    (maildir_store.maildir("alice") / "cur" / "1700000000.link.host:2,").symlink_to(secret)
    maildrop = await maildir_store.open_maildrop("alice")
    assert [await read_all(maildrop, i) for i in range(len(maildrop.messages))] == [b"real\n"]
    await maildrop.release()


async def test_sessions_of_two_workers_race_deliveries_without_losing_mail(
    maildir_store: MaildirStore,
) -> None:
    """Deliveries, logins and commits interleaved across two stores (two workers):
    no UIDL ever names two messages, nothing deleted comes back, nothing is lost."""
    workers = [maildir_store, MaildirStore(maildir_store.root)]
    delivered: set[bytes] = set()
    deleted: set[bytes] = set()
    bodies_by_uidl: dict[str, bytes] = {}
    done = asyncio.Event()

    async def deliverer(name: str) -> None:
        for n in range(60):
            body = f"{name} {n}\n".encode()
            await workers[n % 2].deliver("alice", body)
            delivered.add(body)
            await asyncio.sleep(0)

    async def session(worker: MaildirStore, seed: int) -> None:
        turn = seed
        while not done.is_set():
            try:
                maildrop = await worker.open_maildrop("alice")
            except StoreError:  # MaildropInUse: the other worker holds it
                await asyncio.sleep(0.001)
                continue
            bodies = [await read_all(maildrop, i) for i in range(len(maildrop.messages))]
            for info, body in zip(maildrop.messages, bodies, strict=True):
                assert bodies_by_uidl.setdefault(info.uidl, body) == body
                assert body not in deleted
            doomed = [i for i in range(len(bodies)) if (i + turn) % 3 == 0]
            turn += 1
            await maildrop.commit_deletions(doomed)
            deleted.update(bodies[i] for i in doomed)

    sessions = [asyncio.create_task(session(w, n)) for n, w in enumerate(workers)]
    await asyncio.gather(*(deliverer(name) for name in ("left", "middle", "right")))
    done.set()
    await asyncio.gather(*sessions)
    maildrop = await maildir_store.open_maildrop("alice")
    final = {await read_all(maildrop, i) for i in range(len(maildrop.messages))}
    await maildrop.release()
    assert final == delivered - deleted
    assert len(delivered) == 180
    assert deleted  # the sessions did run between the deliveries


async def test_size_fields_follow_dovecots_meaning(maildir_store: MaildirStore) -> None:
    """W= is Dovecot's virtual size (no final CRLF added), so popbox writes it only for
    messages that end with a line end; LIST is exact either way."""
    ended = b"Subject: ended\n\nbody\n"
    open_ended = b"Subject: open\n\nno final line end"
    assert (await maildir_store.deliver("alice", ended)).endswith(
        f",S={len(ended)},W={wire_size(ended)}"
    )
    assert (await maildir_store.deliver("alice", open_ended)).endswith(f",S={len(open_ended)}")
    maildrop = await maildir_store.open_maildrop("alice")
    assert [info.size for info in maildrop.messages] == [wire_size(ended), wire_size(open_ended)]
    await maildrop.release()


async def test_index_cache_stays_within_its_bound(tmp_path: Path) -> None:
    """Cached indexes are bounded in messages per worker, least recently used out."""
    cache = IndexCache(max_messages=3)
    store = MaildirStore(tmp_path / "mail", index_cache=cache)
    for user in ("alice", "bob", "carol"):
        for n in range(2):
            await store.deliver(user, f"{user} {n}\n".encode())
    for user in ("alice", "bob", "carol"):
        assert len(await uidls(store, user)) == 2
    assert cache.users() == ["carol"]  # the bound is about memory, which only shows here
    for n in range(2, 4):
        await store.deliver("carol", f"carol {n}\n".encode())
    assert len(await uidls(store, "carol")) == 4  # too big for the cache: not kept at all
    assert cache.users() == []


def index_stamp(store: MaildirStore, user: str) -> tuple[int, int, int]:
    info = (store.maildir(user) / INDEX_NAME).stat()
    return info.st_ino, info.st_mtime_ns, info.st_ctime_ns


async def test_quit_without_deletions_leaves_the_index_untouched(
    maildir_store: MaildirStore,
) -> None:
    """A login-STAT-QUIT poll must not rewrite and fsync the index every time."""
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    first = await maildir_store.open_maildrop("alice")  # indexes and moves new/ mail
    uidls_before = [info.uidl for info in first.messages]
    await first.commit_deletions([])
    written = index_stamp(maildir_store, "alice")
    for store in (maildir_store, MaildirStore(maildir_store.root)):  # cached and not
        maildrop = await store.open_maildrop("alice")
        assert [info.uidl for info in maildrop.messages] == uidls_before
        await maildrop.commit_deletions([])
        assert index_stamp(maildir_store, "alice") == written


async def test_quit_with_deletions_still_rewrites_the_index(
    maildir_store: MaildirStore,
) -> None:
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    before = await uidls(maildir_store, "alice")
    written = index_stamp(maildir_store, "alice")
    maildrop = await maildir_store.open_maildrop("alice")
    await maildrop.commit_deletions([1])
    assert index_stamp(maildir_store, "alice") != written
    # The cached snapshot of the next login and a fresh process's agree.
    assert await uidls(maildir_store, "alice") == [before[0], before[2]]
    assert await uidls(MaildirStore(maildir_store.root), "alice") == [before[0], before[2]]


async def test_warm_login_of_a_new_worker_writes_nothing(maildir_store: MaildirStore) -> None:
    await maildir_store.deliver("alice", b"x\n")
    await uidls(maildir_store, "alice")
    written = index_stamp(maildir_store, "alice")
    assert len(await uidls(MaildirStore(maildir_store.root), "alice")) == 1
    assert index_stamp(maildir_store, "alice") == written
    await maildir_store.deliver("alice", b"y\n")  # new mail is a real change
    assert len(await uidls(maildir_store, "alice")) == 2
    assert index_stamp(maildir_store, "alice") != written


async def test_stale_tmp_sweep_runs_once_per_interval(tmp_path: Path) -> None:
    long_ago = time.time() - 3 * 24 * 3600

    async def stale_left_after_login(store: MaildirStore) -> bool:
        stale = store.maildir("alice") / "tmp" / "1600000000.P1.crashed"
        stale.write_bytes(b"partial")
        os.utime(stale, (long_ago, long_ago))
        await uidls(store, "alice")
        return stale.exists()

    hourly = MaildirStore(tmp_path / "mail")
    await hourly.deliver("alice", b"x\n")
    assert not await stale_left_after_login(hourly)  # the first login of a process sweeps
    assert await stale_left_after_login(hourly)  # within the hour it does not again
    always = MaildirStore(tmp_path / "mail", tmp_sweep_interval=0)
    assert not await stale_left_after_login(always)
    assert not await stale_left_after_login(always)


@pytest.mark.parametrize("removed", [".", "cur", "new", "tmp"])
async def test_login_recreates_a_maildir_removed_since_the_last(
    maildir_store: MaildirStore, removed: str
) -> None:
    await maildir_store.deliver("alice", b"first\n")
    assert len(await uidls(maildir_store, "alice")) == 1
    shutil.rmtree(maildir_store.maildir("alice") / removed)
    maildrop = await maildir_store.open_maildrop("alice")
    assert len(maildrop.messages) == (1 if removed in ("new", "tmp") else 0)
    await maildrop.release()
    await maildir_store.deliver("alice", b"second\n")
    assert len(await uidls(maildir_store, "alice")) == (2 if removed in ("new", "tmp") else 1)


async def test_many_unsized_messages_are_sized_exactly_in_arrival_order(
    maildir_store: MaildirStore,
) -> None:
    """Enough foreign messages without W= that a cold login reads them in parallel."""
    maildir = maildir_store.maildir("alice")
    bodies = [b"line\n" * (n % 7) + b"x" * (n % 3) + b"\r\n" * (n % 2) for n in range(600)]
    for n, body in enumerate(bodies):
        drop(maildir, "cur" if n % 2 else "new", f"{1700000000 + n}.V1I{n}.mx", body)
    maildrop = await maildir_store.open_maildrop("alice")
    assert [info.size for info in maildrop.messages] == [wire_size(b) for b in bodies]
    assert [await read_all(maildrop, i) for i in (0, 599)] == [bodies[0], bodies[599]]
    await maildrop.release()


async def test_new_mail_extends_the_cached_snapshot(maildir_store: MaildirStore) -> None:
    for n in range(3):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    first = await maildir_store.open_maildrop("alice")
    before = list(first.messages)
    await first.commit_deletions([])
    await maildir_store.deliver("alice", b"late\n")
    second = await maildir_store.open_maildrop("alice")
    assert list(second.messages[:3]) == before
    assert len(second.messages) == 4
    assert second.messages[3].size == wire_size(b"late\n")
    assert await read_all(second, 3) == b"late\n"
    await second.release()
    # A message deleted by other software: the snapshot is built afresh, and right.
    (message_files(maildir_store.maildir("alice"))[0]).unlink()
    assert await uidls(maildir_store, "alice") == [info.uidl for info in before[1:]] + [
        second.messages[3].uidl
    ]
    assert await uidls(MaildirStore(maildir_store.root), "alice") == await uidls(
        maildir_store, "alice"
    )


def write_version_1_index(maildir: Path) -> None:
    """Rewrite the index as popbox wrote it before version 2: one text line per message."""
    index = read_index(maildir)
    assert index is not None
    header = index.header()
    lines = [
        f"popbox-maildir-index 1 uidvalidity={header.uidvalidity:x} next={header.next_uid}"
        f" count={header.count} octets={header.octets} cur_mtime={header.cur_mtime}"
        f" in_new={header.in_new}\n"
    ]
    lines += [f"{e.uid} {e.size} {e.path}\n" for e in index.entries.values()]
    (maildir / INDEX_NAME).write_text("".join(lines), encoding="utf-8", errors="surrogateescape")


async def test_an_index_of_the_previous_format_keeps_every_uidl(
    maildir_store: MaildirStore,
) -> None:
    """Upgrading popbox must not change a UIDL (clients would download everything
    again) nor hand out a spent UID again (they would skip a new message)."""
    for n in range(4):
        await maildir_store.deliver("alice", f"message {n}\n".encode())
    maildrop = await maildir_store.open_maildrop("alice")
    await maildrop.commit_deletions([3])  # UID 4 is spent: next stays above it
    before = await uidls(maildir_store, "alice")
    maildir = maildir_store.maildir("alice")
    write_version_1_index(maildir)
    upgraded = MaildirStore(maildir_store.root)
    assert await upgraded.usage("alice") == Usage(
        3, sum(len(f"message {n}\n") + 1 for n in range(3))
    )
    assert await uidls(upgraded, "alice") == before
    assert (maildir / INDEX_NAME).read_bytes().startswith(b"popbox-maildir-index 3 ")
    await upgraded.deliver("alice", b"late\n")
    after = await uidls(MaildirStore(maildir_store.root), "alice")
    assert after[:3] == before
    assert after[3] == before[0][:8] + "00000005"


async def test_a_fresh_worker_reads_renames_and_deletes_from_the_index_file(
    maildir_store: MaildirStore,
) -> None:
    """A worker process that has never seen the maildrop serves it from the index
    file's columns: every body, renames during the session, and deletions."""
    bodies = [f"message {n}\n".encode() for n in range(5)]
    for body in bodies:
        await maildir_store.deliver("alice", body)
    before = await uidls(maildir_store, "alice")
    maildir = maildir_store.maildir("alice")
    old = time.time() - 60  # let the index trust cur/'s mtime: the warm path
    os.utime(maildir / "cur", (old, old))
    await uidls(maildir_store, "alice")
    worker = MaildirStore(maildir_store.root)
    maildrop = await worker.open_maildrop("alice")
    assert [info.uidl for info in maildrop.messages] == before
    assert [info.size for info in maildrop.messages] == [wire_size(b) for b in bodies]
    assert [await read_all(maildrop, i) for i in range(5)] == bodies
    for path in (maildir / "cur").iterdir():
        path.rename(path.with_name(path.name + "S"))
    assert await read_all(maildrop, 4) == bodies[4]
    await maildrop.commit_deletions([0, 3])
    assert sorted(path.read_bytes() for path in message_files(maildir)) == [
        bodies[1],
        bodies[2],
        bodies[4],
    ]
    for store in (worker, MaildirStore(maildir_store.root)):
        assert await uidls(store, "alice") == [before[1], before[2], before[4]]


async def test_a_message_whose_key_is_empty_keeps_its_uidl(maildir_store: MaildirStore) -> None:
    """A foreign file named ':2,S' is a message with an empty key; the index must read
    back what it wrote, or every login would rebuild it and change every UIDL."""
    await maildir_store.deliver("alice", b"first\n")
    maildir = maildir_store.maildir("alice")
    drop(maildir, "cur", ":2,S", b"odd name\n")
    before = await uidls(maildir_store, "alice")
    assert len(before) == 2
    for _ in range(2):
        assert await uidls(MaildirStore(maildir_store.root), "alice") == before
