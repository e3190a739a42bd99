"""Kept UIDLs, for every MailStore: a message delivered with the UIDL the replaced server
served keeps it for ever, and no snapshot serves one UIDL twice (store/base.py's
``MailStore.deliver``).

Each test runs once per backend through the ``store`` fixture (conftest.py). The
listings are rendered by the protocol core's own ``Snapshot``, as a session sends them.
"""

from __future__ import annotations

import logging

import pytest

from popbox.errors import InvalidUidl
from popbox.proto.events import SnapshotIndex
from popbox.proto.snapshot import Snapshot
from popbox.store import MaildirStore, MailStore, MemoryStore
from popbox.store.mailbox import MailboxView
from popbox.store.postgresql import PostgresStore
from support.clock import FakeClock
from support.maildrop import read_all

# UIDLs as Dovecot and Courier serve them: what clients that kept mail remember.
DOVECOT = "00002b5a5804f9c1"
COURIER = "1394811722.M417404P5183V0000000000000803I0046C1F2_0.mail,S=1624"
OTHER = "UID42-1394811722"


def message(n: int) -> bytes:
    return f"Subject: {n}\n\nmessage {n}\n".encode()


def again(store: MailStore, clock: FakeClock) -> MailStore:
    """The same mailboxes as another worker process sees them (a Maildir store with
    nothing cached); the memory store is its own only instance, and a PostgreSQL
    store keeps nothing between sessions that another could lack."""
    if isinstance(store, MaildirStore):
        return MaildirStore(store.root, clock=clock)
    assert isinstance(store, (MemoryStore, PostgresStore))
    return store


async def listing(
    store: MailStore, user: str = "alice", view: MailboxView | None = None
) -> list[tuple[bytes, str]]:
    """(body, UIDL) of every message a login sees, the UIDLs as ``UIDL`` and ``UIDL n``
    send them (checked to agree)."""
    maildrop = await (
        store.open_maildrop(user) if view is None else store.open_maildrop(user, view)
    )
    try:
        snapshot = Snapshot(maildrop.messages)
        lines = snapshot.listing("UIDL").decode("ascii").splitlines()
        seen = []
        for index, line in enumerate(lines):
            number, uidl = line.split(" ")
            assert int(number) == index + 1
            assert snapshot.uidl(SnapshotIndex(index)) == uidl  # UIDL n
            seen.append((await read_all(maildrop, index), uidl))
        return seen
    finally:
        await maildrop.release()


def uidl_of(seen: list[tuple[bytes, str]], n: int) -> str:
    [uidl] = [uidl for body, uidl in seen if body.endswith(f"message {n}\n".encode())]
    return uidl


async def test_a_kept_uidl_is_served_verbatim_and_new_mail_gets_popbox_own(
    store: MailStore, clock: FakeClock
) -> None:
    await store.deliver("alice", message(1), uidl=DOVECOT)
    await store.deliver("alice", message(2), uidl=COURIER)
    await store.deliver("alice", message(3))
    seen = await listing(store)
    assert [uidl for _, uidl in seen][:2] == [DOVECOT, COURIER]
    own = uidl_of(seen, 3)
    assert own not in (DOVECOT, COURIER)
    # Another process, and a later login, serve the same.
    assert await listing(again(store, clock)) == seen
    assert await listing(store) == seen


async def test_kept_uidls_survive_deletion_of_other_mail_and_go_with_their_own(
    store: MailStore, clock: FakeClock
) -> None:
    await store.deliver("alice", message(1), uidl=DOVECOT)
    await store.deliver("alice", message(2))
    await store.deliver("alice", message(3), uidl=OTHER)
    maildrop = await store.open_maildrop("alice")
    await maildrop.commit_deletions([1])
    assert [uidl for _, uidl in await listing(store)] == [DOVECOT, OTHER]
    maildrop = await store.open_maildrop("alice")
    await maildrop.commit_deletions([0])
    seen = await listing(again(store, clock))
    assert [uidl for _, uidl in seen] == [OTHER]
    assert seen[0][0].endswith(b"message 3\n")


async def test_every_device_sees_the_kept_uidl(store: MailStore) -> None:
    await store.deliver("alice", message(1))
    await store.deliver("alice", message(2), uidl=DOVECOT)
    await store.deliver("alice", message(3))
    phone = MailboxView(device="phone")
    laptop = MailboxView(device="laptop")
    await listing(store, view=laptop)  # both devices known: the phone's deletion hides only
    maildrop = await store.open_maildrop("alice", phone)
    await maildrop.commit_deletions([0, 2])  # the phone's own view from now on
    assert [uidl for _, uidl in await listing(store, view=phone)] == [DOVECOT]
    seen = await listing(store, view=laptop)
    assert len(seen) == 3
    assert uidl_of(seen, 2) == DOVECOT
    recent = await listing(store, view=MailboxView(device="web", recent=True))
    assert uidl_of(recent, 2) == DOVECOT


async def test_a_kept_uidl_in_a_folder(store: MailStore) -> None:
    await store.deliver("alice", message(1), folder="Work", uidl=DOVECOT)
    seen = await listing(store, view=MailboxView(folder="Work"))
    assert [uidl for _, uidl in seen] == [DOVECOT]


@pytest.mark.parametrize(
    "uidl",
    ["", "has space", "x" * 71, "tab\there", "new\nline", "caf\u00e9", "del\x7f", "nul\x00"],
)
async def test_a_uidl_rfc_1939_does_not_allow_is_refused(store: MailStore, uidl: str) -> None:
    with pytest.raises(InvalidUidl):
        await store.deliver("alice", message(1), uidl=uidl)
    assert (await store.usage("alice")).messages == 0


async def test_the_longest_and_oddest_uidls_rfc_1939_allows_are_kept(store: MailStore) -> None:
    longest = "~" * 70
    odd = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    await store.deliver("alice", message(1), uidl=longest)
    await store.deliver("alice", message(2), uidl=odd)
    await store.deliver("alice", message(3), uidl="1")
    assert [uidl for _, uidl in await listing(store)] == [longest, odd, "1"]


async def test_a_uidl_given_twice_is_served_once_the_first_message_keeps_it(
    store: MailStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    await store.deliver("alice", message(1), uidl=DOVECOT)
    await store.deliver("alice", message(2), uidl=DOVECOT)
    with caplog.at_level(logging.WARNING):
        seen = await listing(store)
    assert uidl_of(seen, 1) == DOVECOT
    assert uidl_of(seen, 2) != DOVECOT
    assert any(DOVECOT in record.getMessage() for record in caplog.records)
    # The decision stands: once the first message is gone, the second does not
    # take the UIDL a client remembers for another message.
    second = uidl_of(seen, 2)
    maildrop = await store.open_maildrop("alice")
    await maildrop.commit_deletions([0])
    assert [uidl for _, uidl in await listing(again(store, clock))] == [second]


async def test_a_uidl_in_popbox_own_form_does_not_take_another_message_s(
    store: MailStore, clock: FakeClock
) -> None:
    await store.deliver("alice", message(1))
    [(_, own)] = await listing(store)
    await store.deliver("alice", message(2), uidl=own)
    seen = await listing(again(store, clock))
    assert uidl_of(seen, 1) == own
    assert uidl_of(seen, 2) != own
    assert len({uidl for _, uidl in seen}) == 2
