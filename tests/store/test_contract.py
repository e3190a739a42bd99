"""The storage contract (store/base.py): every MailStore implementation must pass it.

Each test runs once per backend through the parametrized ``store`` fixture.
"""

from __future__ import annotations

import asyncio

import pytest

from popbox.errors import MaildropInUse, StoreError
from popbox.store import MailStore, Usage
from popbox.wireform import wire_size
from support.maildrop import read_all

# Messages whose wire size differs from their stored size in every way the rule knows.
SAMPLES: list[bytes] = [
    b"Subject: plain\n\nbare LF line ends\n",
    b"Subject: crlf\r\n\r\nalready CRLF\r\n",
    b"Subject: open\n\nno final line end",
    b"Subject: mixed\r\n\nbare CR \r inside\r\n.dot line\n",
    b"\x00\xff 8-bit and NUL \x80\n" + b"x" * 5000 + b"\n",
    # A CR LF pair straddling the 64 KiB chunk boundary of file-backed stores.
    b"A" * (64 * 1024 - 1) + b"\r\n" + b"tail\n",
    b"long body\n" * 30_000,
]


async def deliver_all(store: MailStore, user: str, messages: list[bytes]) -> None:
    for message in messages:
        await store.deliver(user, message)


async def test_new_user_has_an_empty_maildrop(store: MailStore) -> None:
    assert await store.usage("nobody") == Usage(0, 0)
    maildrop = await store.open_maildrop("nobody")
    assert list(maildrop.messages) == []
    assert maildrop.user == "nobody"
    await maildrop.release()


async def test_snapshot_lists_messages_oldest_first_with_wire_sizes(store: MailStore) -> None:
    await deliver_all(store, "alice", SAMPLES)
    maildrop = await store.open_maildrop("alice")
    assert [info.size for info in maildrop.messages] == [wire_size(m) for m in SAMPLES]
    for index, message in enumerate(SAMPLES):
        assert await read_all(maildrop, index) == message
    await maildrop.release()


async def test_bodies_stream_in_bounded_chunks(store: MailStore) -> None:
    big = b"0123456789abcdef\n" * 100_000  # 1.7 MB
    await store.deliver("alice", big)
    maildrop = await store.open_maildrop("alice")
    chunks = [chunk async for chunk in maildrop.read_message(0)]
    assert b"".join(chunks) == big
    assert len(chunks) > 1
    assert max(len(chunk) for chunk in chunks) <= 1024 * 1024
    await maildrop.release()


async def test_uidls_are_printable_unique_and_stable(store: MailStore) -> None:
    await deliver_all(store, "alice", SAMPLES[:4])
    maildrop = await store.open_maildrop("alice")
    uidls = [info.uidl for info in maildrop.messages]
    await maildrop.release()
    assert len(set(uidls)) == len(uidls)
    for uidl in uidls:
        assert 1 <= len(uidl) <= 70
        assert all(0x21 <= ord(char) <= 0x7E for char in uidl)
    again = await store.open_maildrop("alice")
    assert [info.uidl for info in again.messages] == uidls
    await again.release()


async def test_uidls_survive_other_deletions_and_are_never_reused(store: MailStore) -> None:
    await deliver_all(store, "alice", [b"one\n", b"two\n", b"three\n"])
    maildrop = await store.open_maildrop("alice")
    first = [info.uidl for info in maildrop.messages]
    await maildrop.commit_deletions([0, 2])
    await store.deliver("alice", b"four\n")
    maildrop = await store.open_maildrop("alice")
    second = [info.uidl for info in maildrop.messages]
    assert second[0] == first[1]
    assert second[1] not in first
    assert await read_all(maildrop, 1) == b"four\n"
    await maildrop.commit_deletions([0, 1])
    await store.deliver("alice", b"five\n")
    maildrop = await store.open_maildrop("alice")
    (last,) = [info.uidl for info in maildrop.messages]
    assert last not in first + second
    await maildrop.release()


async def test_commit_deletes_exactly_the_given_messages(store: MailStore) -> None:
    messages = [f"message {n}\n".encode() for n in range(6)]
    await deliver_all(store, "alice", messages)
    maildrop = await store.open_maildrop("alice")
    uidls = [info.uidl for info in maildrop.messages]
    await maildrop.commit_deletions({1, 3, 4})
    after = await store.open_maildrop("alice")
    assert [info.uidl for info in after.messages] == [uidls[0], uidls[2], uidls[5]]
    assert [await read_all(after, i) for i in range(3)] == [
        messages[0],
        messages[2],
        messages[5],
    ]
    await after.release()
    expected = sum(wire_size(messages[i]) for i in (0, 2, 5))
    assert await store.usage("alice") == Usage(3, expected)


async def test_commit_with_nothing_to_delete_releases_the_lock(store: MailStore) -> None:
    await store.deliver("alice", b"keep\n")
    maildrop = await store.open_maildrop("alice")
    await maildrop.commit_deletions([])
    again = await store.open_maildrop("alice")
    assert len(again.messages) == 1
    await again.release()


async def test_release_deletes_nothing_and_is_idempotent(store: MailStore) -> None:
    await deliver_all(store, "alice", [b"a\n", b"b\n"])
    maildrop = await store.open_maildrop("alice")
    await maildrop.release()
    await maildrop.release()
    again = await store.open_maildrop("alice")
    assert len(again.messages) == 2
    await again.release()


async def test_commit_after_release_deletes_nothing(store: MailStore) -> None:
    """A session aborted (drop, shutdown) must not commit later by mistake."""
    await store.deliver("alice", b"a\n")
    maildrop = await store.open_maildrop("alice")
    await maildrop.release()
    with pytest.raises(StoreError):
        await maildrop.commit_deletions([0])
    assert (await store.usage("alice")).messages == 1


async def test_second_open_is_refused_until_the_first_ends(store: MailStore) -> None:
    await store.deliver("alice", b"a\n")
    first = await store.open_maildrop("alice")
    with pytest.raises(MaildropInUse):
        await store.open_maildrop("alice")
    # Another user's maildrop is not affected.
    other = await store.open_maildrop("bob")
    await other.release()
    await first.release()
    second = await store.open_maildrop("alice")
    with pytest.raises(MaildropInUse):
        await store.open_maildrop("alice")
    await second.commit_deletions([0])
    third = await store.open_maildrop("alice")
    assert list(third.messages) == []
    await third.release()


async def test_delivery_during_a_session_shows_at_the_next_login(store: MailStore) -> None:
    await store.deliver("alice", b"before\n")
    maildrop = await store.open_maildrop("alice")
    # Delivery never waits for the session's lock.
    await asyncio.wait_for(store.deliver("alice", b"during\n"), timeout=10)
    assert len(maildrop.messages) == 1
    assert await read_all(maildrop, 0) == b"before\n"
    assert await store.usage("alice") == Usage(2, wire_size(b"before\n") + wire_size(b"during\n"))
    await maildrop.commit_deletions([0])
    after = await store.open_maildrop("alice")
    assert len(after.messages) == 1
    assert await read_all(after, 0) == b"during\n"
    await after.release()


async def test_usage_counts_messages_and_wire_octets(store: MailStore) -> None:
    await deliver_all(store, "alice", SAMPLES)
    expected = Usage(len(SAMPLES), sum(wire_size(m) for m in SAMPLES))
    # Before a session has seen them, a store may estimate what it has not sized yet
    # (a Maildir counts what file names and sizes say) but never below the octets
    # stored nor above the wire size; a quota check needs no more.
    before = await store.usage("alice")
    assert before.messages == expected.messages
    assert sum(len(m) for m in SAMPLES) <= before.octets <= expected.octets
    # Exact once a session has indexed the maildrop, and for others.
    maildrop = await store.open_maildrop("alice")
    assert await store.usage("alice") == expected
    await maildrop.release()
    assert await store.usage("alice") == expected
    assert await store.usage("bob") == Usage(0, 0)


async def test_deliver_returns_a_key_per_message(store: MailStore) -> None:
    keys = [await store.deliver("alice", b"same\n") for _ in range(3)]
    assert len(set(keys)) == 3
    assert all(isinstance(key, str) and key for key in keys)


async def test_concurrent_deliveries_all_arrive(store: MailStore) -> None:
    messages = [f"parallel {n}\n".encode() for n in range(20)]
    await asyncio.gather(*(store.deliver("alice", m) for m in messages))
    maildrop = await store.open_maildrop("alice")
    stored = sorted([await read_all(maildrop, i) for i in range(len(maildrop.messages))])
    assert stored == sorted(messages)
    await maildrop.release()
