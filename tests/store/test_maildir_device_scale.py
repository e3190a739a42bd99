"""A big folder read by many devices stays small: the state keeps ranges, views keep slices.

100,000 messages read by 20 devices, each having deleted a few runs of them and a
scattering of single messages: the state and every device's view of the index
(its table over the messages it sees, and where they are in the index) are
measured with tracemalloc. Per-message costs would be tens of megabytes here.
"""

from __future__ import annotations

import tracemalloc

from popbox.proto.snapshot import Snapshot
from popbox.store.devices import FolderState, UidSet
from popbox.store.index import MaildirIndex
from popbox.store.index_cache import MAX_VIEW_MESSAGES, MAX_VIEWS, LoadedIndex
from popbox.store.mailbox import MailboxPolicy
from popbox.store.maildir_view import MaildropView

MESSAGES = 100_000
DEVICES = 20
# What the state and the kept views may take together for this folder: the views'
# own columns (a UID and a size, 16 octets, per message seen) up to the cap of view
# messages, and a little for the state. The index itself is not counted (it is there
# for a single device too), nor are listings, which no test session renders here.
BOUND = 16 * MAX_VIEW_MESSAGES + 4 * 1024 * 1024


def big_index() -> LoadedIndex:
    index = MaildirIndex(uidvalidity=0x65F0A1B2)
    paths = [f"cur/{1_700_000_000 + n}.M{n}P1.host,S=900,W=920:2,S" for n in range(MESSAGES)]
    index.assign_all(paths, [920] * MESSAGES)
    loaded = LoadedIndex(index, (1, 2, 3, 4))
    loaded.snapshot()
    return loaded


def devices_with_deletions(state: FolderState, uids: list[int]) -> None:
    policy = MailboxPolicy()
    for device in range(DEVICES):
        name = f"device{device}"
        state.log_in(name, 1_800_000_000, holds=True, policy=policy)
        runs = [uids[start : start + 2_000] for start in range(device * 3_000, 90_000, 20_000)]
        scattered = uids[device * 7 :: 997]
        state.record_deletions(name, [uid for run in runs for uid in run] + scattered)


def test_state_and_views_of_twenty_devices_on_100000_messages_stay_small() -> None:
    loaded = big_index()
    uids = list(loaded.snapshot()[1].uids)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        state = FolderState(uidvalidity=loaded.index.uidvalidity)
        devices_with_deletions(state, uids)
        sizes = []
        for name in sorted(state.devices):  # a login of each device in turn
            view = loaded.view(name, state.excluded_for(name), None)
            sizes.append(len(view.table))
            check_view(view, uids, state.excluded_for(name))
        del view
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    used = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"state and kept views: {used / 2**20:.2f} MiB, {loaded.views_kept()} views kept")
    assert used < BOUND, f"{used / 2**20:.1f} MiB for the state and the views"
    assert len(state.to_bytes()) < 200_000  # ranges, not ids
    # The views kept are within both bounds, the most recent logins' first.
    assert 1 <= loaded.views_kept() <= MAX_VIEWS
    assert loaded.views_kept() * min(sizes) <= MAX_VIEW_MESSAGES


def check_view(view: MaildropView, uids: list[int], excluded: UidSet) -> None:
    """What the device did not delete, in order, each where it is in the index."""
    gone = {uid for low, high in excluded.ranges() for uid in range(low, high + 1)}
    expected = [position for position, uid in enumerate(uids) if uid not in gone]
    assert len(view.table) == len(expected)
    for index in (0, 1, len(expected) // 2, len(expected) - 1):
        assert view.position(index) == expected[index]
        assert view.table.sizes[index] == 920


def test_a_kept_view_keeps_its_rendered_listing() -> None:
    """The protocol core renders a device's UIDL listing once per view, as it does
    for the single device's snapshot."""
    loaded = big_index()
    uids = list(loaded.snapshot()[1].uids)
    state = FolderState(uidvalidity=loaded.index.uidvalidity)
    devices_with_deletions(state, uids[:100])
    view = loaded.view("device3", state.excluded_for("device3"), None)
    listing = Snapshot(view.table).listing("UIDL")
    again = loaded.view("device3", state.excluded_for("device3"), None)
    assert again is view
    assert Snapshot(again.table).listing("UIDL") is listing
    first_line = listing.split(b"\r\n", 1)[0]
    assert first_line == b"1 " + loaded.index.uidl(uids[view.position(0)]).encode()
