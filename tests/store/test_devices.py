"""The per-folder state's rules and stored form (store/devices.py), without any store."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popbox.errors import LoginTooSoon, TooManyDevices
from popbox.store.devices import (
    LAST_LOGIN_RESOLUTION,
    MAX_DEVICES,
    FolderState,
    StateFormatError,
    UidSet,
    plan_commit,
    plan_removal,
)
from popbox.store.mailbox import DAY, TRASH, Disposition, MailboxPolicy

ids_strategy = st.lists(st.integers(min_value=1, max_value=200), max_size=60)
NOW = 1_800_000_000.0
POLICY = MailboxPolicy()


@given(ids_strategy, ids_strategy, st.integers(min_value=0, max_value=210))
def test_uid_sets_behave_like_sets(a: list[int], b: list[int], probe: int) -> None:
    left, right = UidSet.of(a), UidSet.of(b)
    assert (probe in left) == (probe in set(a))
    assert set(left.union(right).members_in(range(0, 211))) == set(a) | set(b)
    assert set(left.intersection(right).members_in(range(0, 211))) == set(a) & set(b)
    bounds = left.bounds()
    assert bounds == sorted(bounds)
    # Ranges are disjoint and never adjacent: the fewest that hold the set.
    assert all(bounds[i + 1] > bounds[i] + 1 for i in range(1, len(bounds) - 1, 2))


@given(ids_strategy, ids_strategy)
def test_compaction_changes_nothing_for_messages_that_exist(
    members: list[int], existing: list[int]
) -> None:
    ids = sorted(set(existing))
    uids = UidSet.of(members)
    compact = uids.compacted(ids)
    assert compact.members_in(ids) == uids.members_in(ids)
    assert len(compact.bounds()) <= len(uids.bounds())


def test_a_device_that_deleted_everything_in_order_costs_one_range() -> None:
    state = FolderState(7)
    state.log_in("phone", NOW, holds=True, policy=POLICY)
    for start in range(1, 100_001, 1000):
        state.record_deletions("phone", range(start, start + 1000))
    assert state.devices["phone"].deleted.bounds() == [1, 100_000]


def test_the_stored_form_round_trips_and_is_stable() -> None:
    state = FolderState(42)
    state.log_in("phone", NOW, holds=True, policy=POLICY)
    state.log_in("gmail", NOW, holds=False, policy=POLICY)
    state.record_deletions("phone", [1, 2, 3, 9])
    state.record_retrievals([4, 2], NOW)
    state.hide([5, 6], NOW + DAY)
    data = state.to_bytes()
    again = FolderState.from_bytes(data)
    assert again.to_bytes() == data
    assert again.uidvalidity == 42
    assert again.devices["gmail"].last_hold == 0
    assert again.first_retrieval(4) == int(NOW)
    assert again.excluded_for("phone").members_in(range(1, 10)) == [1, 2, 3, 5, 6, 9]


def test_a_newer_format_is_refused_rather_than_guessed() -> None:
    document = json.loads(FolderState(1).to_bytes())
    document["format"] += 1
    with pytest.raises(StateFormatError, match="newer"):
        FolderState.from_bytes(json.dumps(document).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"format":1}',
        b'{"format":1,"uidvalidity":1,"devices":{"../x":{"last_login":1,"last_hold":1,'
        b'"deleted":[]}},"retrieved":[[],[]],"hidden":[]}',
        b'{"format":1,"uidvalidity":1,"devices":{"a":{"last_login":1,"last_hold":1,'
        b'"deleted":[5,3]}},"retrieved":[[],[]],"hidden":[]}',
        b'{"format":1,"uidvalidity":1,"devices":{},"retrieved":[[2,1],[0,0]],"hidden":[]}',
    ],
)
def test_a_damaged_state_is_refused(data: bytes) -> None:
    with pytest.raises(StateFormatError):
        FolderState.from_bytes(data)


def test_logins_are_noted_at_most_once_per_resolution() -> None:
    state = FolderState()
    assert state.log_in("phone", NOW, holds=True, policy=POLICY)
    assert not state.log_in("phone", NOW + 60, holds=True, policy=POLICY)
    assert state.log_in("phone", NOW + LAST_LOGIN_RESOLUTION, holds=True, policy=POLICY)
    # With a login delay every login counts.
    delayed = MailboxPolicy(login_delay=10)
    assert state.log_in("phone", NOW + LAST_LOGIN_RESOLUTION + 20, holds=True, policy=delayed)
    with pytest.raises(LoginTooSoon):
        state.log_in("phone", NOW + LAST_LOGIN_RESOLUTION + 25, holds=True, policy=delayed)


def test_a_full_folder_makes_room_only_from_devices_that_hold_nothing() -> None:
    state = FolderState()
    for n in range(MAX_DEVICES):
        state.log_in(f"d{n}", NOW, holds=True, policy=POLICY)
    with pytest.raises(TooManyDevices):
        state.log_in("one-too-many", NOW, holds=True, policy=POLICY)
    later = NOW + (POLICY.active_days + 1) * DAY
    for n in range(1, MAX_DEVICES):
        state.log_in(f"d{n}", later, holds=True, policy=POLICY)
    state.log_in("newcomer", later, holds=True, policy=POLICY)
    assert "d0" not in state.devices
    assert len(state.devices) == MAX_DEVICES


def test_a_commit_plans_per_disposition() -> None:
    ids = [1, 2, 3, 4]
    for disposition, expected in (
        (Disposition.DELETE, ([1, 2], [], None)),
        (Disposition.TRASH, ([], [1, 2], TRASH)),
        (Disposition.KEEP, ([], [], None)),
    ):
        state = FolderState()
        policy = MailboxPolicy(disposition=disposition)
        state.log_in("default", NOW, holds=True, policy=policy)
        plan = plan_commit(
            state, ids, device="default", deleted=[1, 2], retrieved=[3],
            now=NOW, folder="INBOX", policy=policy,
        )
        assert (plan.delete, plan.move, plan.target) == expected
    assert plan.hidden == 2
    assert state.excluded_for("other").members_in(ids) == [1, 2]
    due = plan_removal(state, ids, now=NOW + 31 * DAY, folder="INBOX", policy=policy)
    assert due.delete == [1, 2]


def test_in_trash_removal_deletes_for_good() -> None:
    state = FolderState()
    policy = MailboxPolicy(disposition=Disposition.TRASH)
    state.log_in("default", NOW, holds=True, policy=policy)
    plan = plan_commit(
        state, [1], device="default", deleted=[1], retrieved=[], now=NOW,
        folder=TRASH, policy=policy,
    )
    assert (plan.delete, plan.move) == ([1], [])


def test_rebase_forgets_per_message_facts_but_not_devices() -> None:
    state = FolderState(1)
    state.log_in("phone", NOW, holds=True, policy=POLICY)
    state.record_deletions("phone", [1, 2])
    state.rebase(2)
    assert state.uidvalidity == 2
    assert "phone" in state.devices
    assert not state.devices["phone"].deleted
