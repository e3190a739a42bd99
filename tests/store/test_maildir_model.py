"""The Maildir store behaves as the reference: the same steps, the same answers.

Random runs of deliveries, logins of several devices (normal and recent mode, with
DELE, RETR, QUIT or a dropped session), days passing, sweeps and forgotten devices
go to a MemoryStore and a MaildirStore side by side, under every disposition and
retention; after every step both must show the same thing: what each login sees
(message by message, oldest first), which login is refused and why, what a sweep
did, the folders, the usage and each device's counts; popbox's own inspecting looks
go along. The memory store is the model the contract is written against, so a
difference is a Maildir bug (or a gap in the contract).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popbox.errors import StoreError
from popbox.store import MaildirStore, MailStore, MemoryStore
from popbox.store.mailbox import Disposition, MailboxPolicy, MailboxView
from support.maildrop import read_all

FOLDERS = ["INBOX", "Trash", "Archive", "lists.python"]
DEVICES = ["default", "phone", "laptop", "tablet"]
USER = "alice"


class TickingClock:
    """A clock that starts on a whole second, moves a millisecond at every reading
    (so names made one after another keep their order) and jumps when told."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.001
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Login:
    folder: str
    device: str
    recent: bool
    ending: str  # "quit", "drop"
    dele: frozenset[int]
    retr: frozenset[int]


@dataclass(frozen=True)
class Deliver:
    folder: str


@dataclass(frozen=True)
class Advance:
    hours: int


@dataclass(frozen=True)
class Inspect:
    """popbox's own look at a folder (INSPECT_VIEW), which may not delete."""

    folder: str
    tries_to_delete: bool


@dataclass(frozen=True)
class Sweep:
    pass


@dataclass(frozen=True)
class Forget:
    device: str


@dataclass(frozen=True)
class BusySweep:
    """A sweep and a forget while a session holds INBOX."""

    device: str


# Mostly INBOX, where mail arrives; the other folders fill by moves and deliveries.
folders = st.sampled_from(["INBOX"] * 4 + FOLDERS)
positions = st.frozensets(st.integers(0, 5), max_size=4)
steps = st.one_of(
    st.builds(Deliver, folders),
    st.builds(Deliver, st.just("INBOX")),
    st.builds(Deliver, st.just("INBOX")),
    *[
        st.builds(
            Login,
            folders,
            st.sampled_from(DEVICES),
            st.sampled_from([False, False, True]),
            st.sampled_from(["quit", "quit", "drop"]),
            positions,
            positions,
        )
    ]
    * 3,
    st.builds(Advance, st.sampled_from([1, 12, 24, 24 * 3, 24 * 8, 24 * 31])),
    st.builds(Inspect, folders, st.booleans()),
    st.builds(Sweep),
    st.builds(Forget, st.sampled_from(DEVICES)),
    st.builds(BusySweep, st.sampled_from(DEVICES)),
)
policies = st.builds(
    MailboxPolicy,
    disposition=st.sampled_from(list(Disposition)),
    keep_days=st.sampled_from([1, 10]),
    trash_days=st.sampled_from([1, 10]),
    retention_days=st.sampled_from([None, None, 0, 2]),
    active_days=st.sampled_from([2, 30]),
    recent_days=st.sampled_from([1, 30]),
    login_delay=st.sampled_from([0, 0, 600]),
)


async def step(
    store: MailStore, clock: TickingClock, policy: MailboxPolicy, act: Any, number: int
) -> Any:
    """Carry out step ``number``; what a user would see of it."""
    if isinstance(act, Deliver):
        message = f"Subject: {number}\n\nto {act.folder}\n".encode()
        await store.deliver(USER, message, folder=act.folder)
        return None
    if isinstance(act, Advance):
        clock.advance(act.hours * 3600)
        return None
    if isinstance(act, Sweep):
        report = await store.sweep(USER, policy)
        return (report.removed, report.moved, report.hidden, sorted(report.busy))
    if isinstance(act, Forget):
        return await store.forget_device(USER, act.device)
    if isinstance(act, BusySweep):
        # In recent mode and without a login delay: a holder that holds nothing back.
        holder = MailboxView(device="holder", recent=True, policy=replace(policy, login_delay=0))
        held = await store.open_maildrop(USER, holder)
        try:
            report = await store.sweep(USER, policy)
            try:
                forgotten: object = await store.forget_device(USER, act.device)
            except StoreError as exc:
                forgotten = type(exc).__name__
        finally:
            await held.release()
        return (sorted(report.busy), forgotten)
    if isinstance(act, Inspect):
        try:
            looked = await store.open_maildrop(USER, MailboxView(folder=act.folder, inspect=True))
        except StoreError as exc:
            return type(exc).__name__
        stored = [await read_all(looked, index) for index in range(len(looked.messages))]
        if not act.tries_to_delete:
            await looked.release()
            return stored
        try:
            await looked.commit_deletions([0])
        except StoreError as exc:
            return stored, type(exc).__name__
        return stored, "deleted"
    assert isinstance(act, Login)
    view = MailboxView(folder=act.folder, device=act.device, recent=act.recent, policy=policy)
    try:
        maildrop = await store.open_maildrop(USER, view)
    except StoreError as exc:
        return type(exc).__name__
    seen = [await read_all(maildrop, index) for index in range(len(maildrop.messages))]
    count = len(seen)
    for index in act.retr:
        if index < count:
            maildrop.mark_retrieved(index)
    if act.ending == "quit":
        await maildrop.commit_deletions([index for index in act.dele if index < count])
    else:
        await maildrop.release()
    return seen


async def looks(store: MailStore) -> Any:
    """Everything about the mailbox a user or an operator can see without a login."""
    devices = [
        (report.folder, report.device, report.pending, report.deleted)
        for report in await store.devices(USER)
    ]
    return await store.folders(USER), await store.usage(USER), devices


async def run_both(policy: MailboxPolicy, acts: list[Any], root: Path) -> None:
    start = float(int(time.time()))
    memory_clock, maildir_clock = TickingClock(start), TickingClock(start)
    memory = MemoryStore(clock=memory_clock)
    maildir = MaildirStore(root, clock=maildir_clock)
    try:
        # Mail to work on from the start: four messages in INBOX.
        for number, act in enumerate([Deliver("INBOX")] * 4 + acts):
            expected = await step(memory, memory_clock, policy, act, number)
            got = await step(maildir, maildir_clock, policy, act, number)
            assert got == expected, f"step {number} {act}"
            assert await looks(maildir) == await looks(memory), f"after step {number} {act}"
    finally:
        await maildir.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies, acts=st.lists(steps, min_size=8, max_size=40))
def test_the_maildir_store_answers_as_the_reference_does(
    policy: MailboxPolicy, acts: list[Any]
) -> None:
    with tempfile.TemporaryDirectory() as root:
        asyncio.run(run_both(policy, acts, Path(root)))
