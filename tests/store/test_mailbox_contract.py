"""The mailbox model's contract (store/base.py, store/mailbox.py): devices, folders,
recent mode, dispositions, retention and LOGIN-DELAY, for every MailStore.

Each test runs once per backend through the ``store`` fixture (conftest.py); time is
the ``clock`` fixture's, moved forward by whole days instead of slept.
"""

from __future__ import annotations

import dataclasses

import pytest

from popbox.errors import (
    InvalidMailboxName,
    LoginTooSoon,
    MaildropInUse,
    NoSuchFolder,
    StoreError,
)
from popbox.store import MailStore
from popbox.store.mailbox import (
    ARCHIVE,
    INBOX,
    INSPECT_VIEW,
    TRASH,
    Disposition,
    MailboxPolicy,
    MailboxView,
)
from support.clock import FakeClock
from support.maildrop import read_all

POLICY = MailboxPolicy()


def view(device: str = "default", **kwargs: object) -> MailboxView:
    policy = kwargs.pop("policy", POLICY)
    assert isinstance(policy, MailboxPolicy)
    return MailboxView(device=device, policy=policy, **kwargs)  # type: ignore[arg-type]


async def uidls_seen(store: MailStore, user: str, v: MailboxView) -> list[str]:
    maildrop = await store.open_maildrop(user, v)
    try:
        return [info.uidl for info in maildrop.messages]
    finally:
        await maildrop.release()


async def delete_all(store: MailStore, user: str, v: MailboxView) -> list[str]:
    """Log in as ``v``, DELE everything it sees, QUIT; the UIDLs it deleted."""
    maildrop = await store.open_maildrop(user, v)
    seen = [info.uidl for info in maildrop.messages]
    await maildrop.commit_deletions(range(len(seen)))
    return seen


async def delete_uidls(store: MailStore, user: str, v: MailboxView, uidls: set[str]) -> None:
    maildrop = await store.open_maildrop(user, v)
    await maildrop.commit_deletions(
        [i for i, info in enumerate(maildrop.messages) if info.uidl in uidls]
    )


async def deliver(store: MailStore, count: int, user: str = "alice", **kwargs: str) -> None:
    for n in range(count):
        await store.deliver(user, f"Subject: {n}\n\nmessage {n}\n".encode(), **kwargs)


# -- devices --------------------------------------------------------------------------


async def test_devices_see_the_same_messages_with_the_same_uidls(store: MailStore) -> None:
    await deliver(store, 3)
    phone = await uidls_seen(store, "alice", view("phone"))
    laptop = await uidls_seen(store, "alice", view("laptop"))
    default = await uidls_seen(store, "alice", view())
    assert phone == laptop == default
    assert len(phone) == 3


async def test_a_device_deletion_hides_the_message_from_that_device_only(
    store: MailStore,
) -> None:
    await deliver(store, 3)
    everything = await uidls_seen(store, "alice", view("laptop"))
    await delete_uidls(store, "alice", view("phone"), {everything[1]})
    assert await uidls_seen(store, "alice", view("phone")) == [
        everything[0],
        everything[2],
    ]
    assert await uidls_seen(store, "alice", view("laptop")) == everything
    assert (await store.usage("alice")).messages == 3


async def test_a_message_goes_once_every_active_device_has_deleted_it(
    store: MailStore,
) -> None:
    await deliver(store, 2)
    await uidls_seen(store, "alice", view("laptop"))
    everything = await delete_all(store, "alice", view("phone"))
    assert (await store.usage("alice")).messages == 2
    await delete_uidls(store, "alice", view("laptop"), {everything[0]})
    assert (await store.usage("alice")).messages == 1
    # A device that joins later sees what is still stored, whatever others did.
    assert await uidls_seen(store, "alice", view("tablet")) == [everything[1]]


async def test_a_single_default_device_is_plain_rfc_1939(store: MailStore) -> None:
    await deliver(store, 3)
    maildrop = await store.open_maildrop("alice")
    uidls = [info.uidl for info in maildrop.messages]
    await maildrop.commit_deletions([0, 2])
    assert (await store.usage("alice")).messages == 1
    assert await uidls_seen(store, "alice", view()) == [uidls[1]]


async def test_a_device_that_stopped_coming_back_holds_nothing(
    store: MailStore, clock: FakeClock
) -> None:
    await deliver(store, 2)
    await uidls_seen(store, "alice", view("old-laptop"))
    clock.advance(days=POLICY.active_days + 1)
    await delete_all(store, "alice", view("phone"))
    assert (await store.usage("alice")).messages == 0


async def test_the_idle_device_coming_back_holds_again(
    store: MailStore, clock: FakeClock
) -> None:
    await deliver(store, 1)
    await uidls_seen(store, "alice", view("laptop"))
    await uidls_seen(store, "alice", view("phone"))
    clock.advance(days=POLICY.active_days + 1)
    await uidls_seen(store, "alice", view("laptop"))  # back again
    await delete_all(store, "alice", view("phone"))
    assert (await store.usage("alice")).messages == 1


async def test_a_deletion_before_another_device_went_idle_is_carried_out_by_the_sweep(
    store: MailStore, clock: FakeClock
) -> None:
    await deliver(store, 1)
    await uidls_seen(store, "alice", view("laptop"))
    await delete_all(store, "alice", view("phone"))
    assert (await store.usage("alice")).messages == 1
    clock.advance(days=POLICY.active_days / 2)
    await uidls_seen(store, "alice", view("phone"))  # phone stays active
    clock.advance(days=POLICY.active_days / 2 + 1)
    report = await store.sweep("alice", POLICY)
    assert report.removed == 1
    assert (await store.usage("alice")).messages == 0


async def test_with_no_active_device_nothing_goes(store: MailStore, clock: FakeClock) -> None:
    await deliver(store, 1)
    await delete_all(store, "alice", view("phone"))
    await deliver(store, 1)
    clock.advance(days=POLICY.active_days * 3)
    report = await store.sweep("alice", POLICY)
    assert report.removed == 0
    assert (await store.usage("alice")).messages == 1


async def test_forgetting_a_lost_device_releases_its_hold(store: MailStore) -> None:
    await deliver(store, 2)
    await uidls_seen(store, "alice", view("lost-phone"))
    await delete_all(store, "alice", view("laptop"))
    assert (await store.usage("alice")).messages == 2
    assert await store.forget_device("alice", "lost-phone") == 1
    assert await store.forget_device("alice", "lost-phone") == 0
    report = await store.sweep("alice", POLICY)
    assert report.removed == 2
    assert (await store.usage("alice")).messages == 0


async def test_device_reports_count_pending_and_deleted(store: MailStore) -> None:
    await deliver(store, 3)
    await uidls_seen(store, "alice", view("laptop"))
    everything = await uidls_seen(store, "alice", view("phone"))
    await delete_uidls(store, "alice", view("phone"), {everything[0]})
    reports = {(r.folder, r.device): r for r in await store.devices("alice")}
    assert set(reports) == {(INBOX, "laptop"), (INBOX, "phone")}
    assert (reports[INBOX, "phone"].pending, reports[INBOX, "phone"].deleted) == (2, 1)
    assert (reports[INBOX, "laptop"].pending, reports[INBOX, "laptop"].deleted) == (3, 0)
    assert reports[INBOX, "phone"].last_login > 0
    assert reports[INBOX, "phone"].last_hold > 0


async def test_forgetting_a_device_of_a_folder_in_use_is_refused(
    store: MailStore,
) -> None:
    await deliver(store, 1)
    await uidls_seen(store, "alice", view("phone"))
    held = await store.open_maildrop("alice", view("laptop"))
    with pytest.raises(MaildropInUse):
        await store.forget_device("alice", "phone")
    await held.release()
    assert await store.forget_device("alice", "phone") == 1


async def test_device_names_that_cannot_be_one_are_refused(store: MailStore) -> None:
    for bad in ("", "../x", "a/b/c", "pho\nne", ".hidden", "-opt", "x" * 300):
        with pytest.raises(InvalidMailboxName):
            await store.open_maildrop("alice", view(bad))


async def test_an_inspecting_view_sees_everything_stored_and_is_no_device(
    store: MailStore,
) -> None:
    await deliver(store, 2)
    await uidls_seen(store, "alice", view("laptop"))
    everything = await delete_all(store, "alice", view("phone"))
    assert await uidls_seen(store, "alice", INSPECT_VIEW) == everything
    assert {r.device for r in await store.devices("alice")} == {"laptop", "phone"}
    inspecting = await store.open_maildrop("alice", INSPECT_VIEW)
    with pytest.raises(StoreError):
        await inspecting.commit_deletions([0])
    assert (await store.usage("alice")).messages == 2
    await uidls_seen(store, "alice", view("laptop"))  # the lock was released


# -- recent mode ---------------------------------------------------------------------


async def test_recent_mode_offers_what_other_devices_took(store: MailStore) -> None:
    await deliver(store, 2)
    await uidls_seen(store, "alice", view("laptop"))
    everything = await delete_all(store, "alice", view("phone"))
    assert await uidls_seen(store, "alice", view("gmail", recent=True)) == everything


async def test_recent_mode_looks_back_recent_days_only(
    store: MailStore, clock: FakeClock
) -> None:
    await deliver(store, 1)
    clock.advance(days=POLICY.recent_days + 1)
    await deliver(store, 1)
    full = await uidls_seen(store, "alice", view("laptop"))
    assert await uidls_seen(store, "alice", view("gmail", recent=True)) == full[1:]


async def test_recent_mode_holds_nothing_back(store: MailStore) -> None:
    await deliver(store, 1)
    await uidls_seen(store, "alice", view("gmail", recent=True))
    await delete_all(store, "alice", view("phone"))
    assert (await store.usage("alice")).messages == 0


async def test_recent_mode_hides_what_it_deleted_itself(store: MailStore) -> None:
    await deliver(store, 2)
    await uidls_seen(store, "alice", view("phone"))
    everything = await uidls_seen(store, "alice", view("gmail", recent=True))
    await delete_uidls(store, "alice", view("gmail", recent=True), {everything[0]})
    assert await uidls_seen(store, "alice", view("gmail", recent=True)) == everything[1:]
    assert (await store.usage("alice")).messages == 2


# -- dispositions --------------------------------------------------------------------


async def test_trash_moves_then_empties_after_trash_days(
    store: MailStore, clock: FakeClock
) -> None:
    policy = MailboxPolicy(disposition=Disposition.TRASH, trash_days=7)
    await deliver(store, 2)
    maildrop = await store.open_maildrop("alice", view(policy=policy))
    first = await read_all(maildrop, 0)
    await maildrop.commit_deletions([0])
    assert await store.folders("alice") == [INBOX, TRASH]
    assert len(await uidls_seen(store, "alice", view(policy=policy))) == 1
    trash = await store.open_maildrop("alice", view(folder=TRASH, policy=policy))
    assert [await read_all(trash, i) for i in range(len(trash.messages))] == [first]
    await trash.release()
    assert (await store.usage("alice")).messages == 2
    clock.advance(days=6)
    assert (await store.sweep("alice", policy)).removed == 0
    clock.advance(days=2)
    assert (await store.sweep("alice", policy)).removed == 1
    assert (await store.usage("alice")).messages == 1


async def test_archive_moves_and_keeps(store: MailStore, clock: FakeClock) -> None:
    policy = MailboxPolicy(disposition=Disposition.ARCHIVE)
    await deliver(store, 1)
    await delete_all(store, "alice", view(policy=policy))
    assert await uidls_seen(store, "alice", view(policy=policy)) == []
    assert len(await uidls_seen(store, "alice", view(folder=ARCHIVE))) == 1
    clock.advance(days=3650)
    await store.sweep("alice", policy)
    assert len(await uidls_seen(store, "alice", view(folder=ARCHIVE))) == 1


async def test_deleting_in_trash_deletes_for_good(store: MailStore) -> None:
    policy = MailboxPolicy(disposition=Disposition.TRASH)
    await deliver(store, 1)
    await delete_all(store, "alice", view(policy=policy))
    await delete_all(store, "alice", view(folder=TRASH, policy=policy))
    assert (await store.usage("alice")).messages == 0


async def test_keep_hides_from_every_device_then_removes(
    store: MailStore, clock: FakeClock
) -> None:
    policy = MailboxPolicy(disposition=Disposition.KEEP, keep_days=10)
    await deliver(store, 2)
    everything = await delete_all(store, "alice", view(policy=policy))
    assert len(everything) == 2
    assert await uidls_seen(store, "alice", view(policy=policy)) == []
    assert await uidls_seen(store, "alice", view("new", policy=policy)) == []
    assert await uidls_seen(store, "alice", view("r", recent=True, policy=policy)) == []
    assert (await store.usage("alice")).messages == 2
    clock.advance(days=9)
    assert (await store.sweep("alice", policy)).removed == 0
    clock.advance(days=2)
    assert (await store.sweep("alice", policy)).removed == 2
    assert (await store.usage("alice")).messages == 0


# -- retention -----------------------------------------------------------------------


async def test_retention_counts_from_the_first_retrieval(
    store: MailStore, clock: FakeClock
) -> None:
    policy = MailboxPolicy(retention_days=7)
    await deliver(store, 2)
    clock.advance(days=30)  # waiting on the server does not count
    maildrop = await store.open_maildrop("alice", view(policy=policy))
    maildrop.mark_retrieved(0)
    await maildrop.commit_deletions([])
    clock.advance(days=6)
    assert (await store.sweep("alice", policy)).removed == 0
    # A later retrieval does not restart the count.
    maildrop = await store.open_maildrop("alice", view("phone", policy=policy))
    maildrop.mark_retrieved(0)
    await maildrop.release()
    clock.advance(days=2)
    assert (await store.sweep("alice", policy)).removed == 1
    assert (await store.usage("alice")).messages == 1


async def test_retention_follows_the_disposition(store: MailStore, clock: FakeClock) -> None:
    policy = MailboxPolicy(retention_days=1, disposition=Disposition.ARCHIVE)
    await deliver(store, 1)
    maildrop = await store.open_maildrop("alice", view(policy=policy))
    maildrop.mark_retrieved(0)
    await maildrop.release()
    clock.advance(days=2)
    assert (await store.sweep("alice", policy)).moved == 1
    assert len(await uidls_seen(store, "alice", view(folder=ARCHIVE))) == 1


async def test_expire_zero_removes_what_was_retrieved_at_quit(store: MailStore) -> None:
    policy = MailboxPolicy(retention_days=0)
    await deliver(store, 2)
    await uidls_seen(store, "alice", view("laptop", policy=policy))
    maildrop = await store.open_maildrop("alice", view(policy=policy))
    maildrop.mark_retrieved(1)
    await maildrop.commit_deletions([])
    assert (await store.usage("alice")).messages == 1


async def test_without_retention_retrieved_mail_stays(
    store: MailStore, clock: FakeClock
) -> None:
    await deliver(store, 1)
    maildrop = await store.open_maildrop("alice", view())
    maildrop.mark_retrieved(0)
    await maildrop.commit_deletions([])
    clock.advance(days=3650)
    await store.sweep("alice", POLICY)
    assert (await store.usage("alice")).messages == 1


# -- LOGIN-DELAY ---------------------------------------------------------------------


async def test_login_delay_is_per_device(store: MailStore, clock: FakeClock) -> None:
    policy = MailboxPolicy(login_delay=300)
    await uidls_seen(store, "alice", view("phone", policy=policy))
    clock.advance(seconds=100)
    with pytest.raises(LoginTooSoon) as refused:
        await store.open_maildrop("alice", view("phone", policy=policy))
    assert 0 < refused.value.retry_after <= 200
    await uidls_seen(store, "alice", view("laptop", policy=policy))
    clock.advance(seconds=200)
    await uidls_seen(store, "alice", view("phone", policy=policy))
    # A refused login leaves the folder free.
    with pytest.raises(LoginTooSoon):
        await store.open_maildrop("alice", view("phone", policy=policy))
    await uidls_seen(store, "alice", view("tablet", policy=policy))


# -- folders -------------------------------------------------------------------------


async def test_delivery_into_a_folder_and_a_folder_login(store: MailStore) -> None:
    await store.deliver("alice", b"Subject: invoice\n\n1\n", folder="invoices")
    await deliver(store, 1)
    assert await store.folders("alice") == [INBOX, "invoices"]
    maildrop = await store.open_maildrop("alice", view(folder="invoices"))
    assert [await read_all(maildrop, 0)] == [b"Subject: invoice\n\n1\n"]
    await maildrop.release()
    assert len(await uidls_seen(store, "alice", view())) == 1
    assert (await store.usage("alice")).messages == 2


async def test_folders_have_their_own_devices(store: MailStore) -> None:
    await store.deliver("alice", b"x\n", folder="invoices")
    await uidls_seen(store, "alice", view("laptop"))
    await delete_all(store, "alice", view("phone", folder="invoices"))
    # The laptop never opened invoices: it holds nothing there.
    assert (await store.usage("alice")).messages == 0


async def test_a_folder_that_does_not_exist_is_refused(store: MailStore) -> None:
    with pytest.raises(NoSuchFolder):
        await store.open_maildrop("alice", view(folder="nothing"))
    assert await store.folders("alice") == [INBOX]


@pytest.mark.parametrize(
    "name", ["..", "../bob", "a/b", ".hidden", "a..b", "tab\there", "x" * 200, "", "new\n"]
)
async def test_folder_names_that_could_escape_are_refused(
    store: MailStore, name: str
) -> None:
    with pytest.raises(InvalidMailboxName):
        await store.open_maildrop("alice", view(folder=name))
    with pytest.raises(InvalidMailboxName):
        await store.deliver("alice", b"x\n", folder=name)


async def test_inbox_in_any_case_is_the_inbox(store: MailStore) -> None:
    await deliver(store, 1)
    assert len(await uidls_seen(store, "alice", view(folder="inbox"))) == 1
    await store.deliver("alice", b"x\n", folder="Inbox")
    assert await store.folders("alice") == [INBOX]


# -- sweeping ------------------------------------------------------------------------


async def test_the_sweep_skips_a_folder_in_use(store: MailStore, clock: FakeClock) -> None:
    policy = MailboxPolicy(disposition=Disposition.KEEP, keep_days=1)
    await deliver(store, 1)
    await delete_all(store, "alice", view(policy=policy))
    clock.advance(days=2)
    held = await store.open_maildrop("alice", view("phone", policy=policy))
    report = await store.sweep("alice", policy)
    assert report.busy == [INBOX]
    assert report.removed == 0
    await held.release()
    assert (await store.sweep("alice", policy)).removed == 1


async def test_a_sweep_of_a_user_without_mail_does_nothing(store: MailStore) -> None:
    report = await store.sweep("nobody", POLICY)
    assert dataclasses.astuple(report) == (0, 0, 0, [])
