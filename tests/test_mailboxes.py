"""The sweep of every mailbox (popbox.mailboxes): per-user policies, one line per user
that had something done, failures that do not stop the others, and `popbox serve`'s
background sweeper, which runs on its own and stops without a trace at shutdown.

The memory store runs on a clock the tests move, so days pass without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from popbox.auth.base import UserRecord
from popbox.config import Config, config_from_dict
from popbox.errors import StoreError
from popbox.mailboxes import MailboxSweeper, policy_values, stop_task, sweep_all, sweep_users
from popbox.store.mailbox import DAY, TRASH, MailboxPolicy, MailboxView, SweepReport
from popbox.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, **mailbox: object) -> Config:
    return config_from_dict({"data_dir": str(tmp_path), "mailbox": mailbox}, tmp_path)


RECORDS = [
    UserRecord("alice", extra={"popbox_retention_days": "1"}),
    UserRecord("bob", extra={"popbox_disposition": "trash"}),
    UserRecord("carol"),
]


async def _session(
    store: MemoryStore,
    config: Config,
    record: UserRecord,
    device: str,
    *,
    retrieve: tuple[int, ...] = (),
    delete: tuple[int, ...] = (),
) -> None:
    policy = config.mailbox.policy_for(record.extra, user=record.name)
    maildrop = await store.open_maildrop(record.name, MailboxView(device=device, policy=policy))
    for index in retrieve:
        maildrop.mark_retrieved(index)
    await maildrop.commit_deletions(delete)


async def test_each_user_is_swept_with_their_own_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = _config(tmp_path, active_days=10)
    alice, bob, carol = RECORDS
    for record in RECORDS:
        for index in range(3):
            await store.deliver(record.name, b"Subject: %d\n\nx\n" % index)
    await _session(store, config, alice, "phone", retrieve=(0,))
    # bob's laptop holds mail back while it is active; his phone deletes two.
    await _session(store, config, bob, "laptop")
    await _session(store, config, bob, "phone", delete=(0, 1))
    await _session(store, config, carol, "phone", retrieve=(0, 1, 2))

    caplog.set_level(logging.INFO, logger="popbox.mailboxes")
    today = await sweep_users(config.mailbox, store, RECORDS)
    assert today.total == SweepReport()
    assert [record.message for record in caplog.records] == [
        "swept 3 users: 0 removed, 0 moved, 0 hidden"
    ]

    # Eleven days on: alice's retrieved message expired; bob's laptop stopped holding
    # (active_days), but then nobody holds and his phone went idle too: nothing goes
    # by that rule. carol has no retention.
    caplog.clear()
    clock.now += 11 * DAY
    later = await sweep_users(config.mailbox, store, RECORDS)
    assert [(item.user, item.report) for item in later.users] == [
        ("alice", SweepReport(removed=1)),
        ("bob", SweepReport()),
        ("carol", SweepReport()),
    ]
    assert [record.message for record in caplog.records] == [
        "sweep of alice: 1 removed, 0 moved, 0 hidden",
        "swept 3 users: 1 removed, 0 moved, 0 hidden",
    ]
    assert (await store.usage("alice")).messages == 2

    # bob's phone logs in again: it holds, the laptop does not, so his two
    # deletions now go, to Trash (his disposition).
    await _session(store, config, bob, "phone")
    assert await store.folders("bob") == ["INBOX", TRASH]
    assert (await store.usage("bob")).messages == 3


async def test_a_failing_user_is_logged_and_the_others_are_swept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class FailingStore(MemoryStore):
        async def sweep(
            self, user: str, policy: MailboxPolicy, *, now: float | None = None
        ) -> SweepReport:
            if user == "bob":
                raise StoreError("state of bob is damaged")
            return await super().sweep(user, policy, now=now)

    clock = Clock()
    store = FailingStore(clock=clock)
    config = _config(tmp_path)
    for record in RECORDS:
        await store.deliver(record.name, b"Subject: x\n\nx\n")
        await _session(store, config, record, "phone", retrieve=(0,))
    caplog.set_level(logging.INFO, logger="popbox.mailboxes")
    summary = await sweep_users(config.mailbox, store, RECORDS, now=clock.now + 2 * DAY)
    assert [item.user for item in summary.failed] == ["bob"]
    assert summary.total == SweepReport(removed=1)
    assert "sweep of bob failed: state of bob is damaged" in caplog.messages
    assert caplog.messages[-1] == "swept 3 users: 1 removed, 0 moved, 0 hidden; 1 failed: bob"


async def test_the_sweep_takes_the_users_from_the_passwd_file(tmp_path: Path) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = _config(tmp_path, retention_days=0, disposition="keep", keep_days=2)
    config.auth.passwd_file.write_text("ann:{PLAIN}x\nben:{PLAIN}x::::::popbox_keep_days=5\n")
    users = [UserRecord("ann"), UserRecord("ben", extra={"popbox_keep_days": "5"})]
    for record in [*users, UserRecord("stranger")]:
        await store.deliver(record.name, b"Subject: x\n\nx\n")
        await _session(store, config, record, "phone", retrieve=(0,))
    # EXPIRE 0 with KEEP: hidden at QUIT, the file goes after keep_days; ben keeps 5.
    assert (await store.usage("ann")).messages == 1
    summary = await sweep_all(config, store, now=clock.now + 3 * DAY)
    assert [item.user for item in summary.users] == ["ann", "ben"]
    assert summary.total == SweepReport(removed=1)
    assert (await store.usage("ann")).messages == 0
    assert (await store.usage("ben")).messages == 1
    assert (await store.usage("stranger")).messages == 1  # not a user: never swept


async def test_the_background_sweeper_sweeps_again_and_again(tmp_path: Path) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = _config(tmp_path, sweep_interval=0.01, retention_days=1)
    config.auth.passwd_file.write_text("ann:{PLAIN}x\n")
    await store.deliver("ann", b"Subject: 1\n\nx\n")
    await _session(store, config, UserRecord("ann"), "phone", retrieve=(0,))
    sweeper = MailboxSweeper(config, store, start_delay=0)
    task = sweeper.start()
    while sweeper.sweeps < 1:
        await asyncio.sleep(0.01)
    assert (await store.usage("ann")).messages == 1
    # Days later the message's retention has run out: a later sweep removes it.
    clock.now += 2 * DAY
    while (await store.usage("ann")).messages:
        await asyncio.sleep(0.01)
    await stop_task(task)
    assert task.cancelled()


async def test_a_failed_sweep_is_logged_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, sweep_interval=0.01)
    config.auth.passwd_file.mkdir()  # unreadable as a file
    sweeper = MailboxSweeper(config, MemoryStore(), start_delay=0)
    task = sweeper.start()
    while sweeper.sweeps < 2:
        await asyncio.sleep(0.01)
    await stop_task(task)
    failures = [r for r in caplog.records if r.message.startswith("sweep of every mailbox failed")]
    assert len(failures) >= 2
    assert all(record.exc_info is not None for record in failures)


async def test_stopping_the_sweeper_mid_sweep_is_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entered = asyncio.Event()

    class SlowStore(MemoryStore):
        async def sweep(
            self, user: str, policy: MailboxPolicy, *, now: float | None = None
        ) -> SweepReport:
            entered.set()
            await asyncio.Event().wait()  # a sweep that would run past shutdown
            raise AssertionError("unreachable")

    config = _config(tmp_path)
    config.auth.passwd_file.write_text("ann:{PLAIN}x\n")
    task = MailboxSweeper(config, SlowStore(), start_delay=0).start()
    await entered.wait()
    caplog.clear()
    await stop_task(task)
    assert task.cancelled()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_stopping_does_not_swallow_the_callers_own_cancellation(tmp_path: Path) -> None:
    config = _config(tmp_path, sweep_interval=3600)
    sweeper_task = MailboxSweeper(config, MemoryStore()).start()

    outer = asyncio.get_running_loop().create_task(stop_task(sweeper_task))
    await asyncio.sleep(0)  # outer now waits in stop_task for the sweeper to end
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sweeper_task.cancelled()


def test_policy_values_say_where_each_value_comes_from(tmp_path: Path) -> None:
    config = _config(tmp_path, disposition="archive", retention_days=90)
    extra = {"popbox_retention_days": "never", "popbox_login_delay": "-5"}
    policy, values = policy_values(config.mailbox, extra, user="ann")
    assert policy.retention_days is None
    shown = {value.name: (value.value, value.source) for value in values}
    assert shown["disposition"] == ("archive", "server")
    assert shown["retention_days"] == ("never", "user")
    assert shown["login_delay"] == ("none", "server (popbox_login_delay='-5' ignored)")
    assert shown["keep_days"] == ("30 days", "server")
