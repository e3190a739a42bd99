"""The Deliverer on its own: verdicts, quotas, trace headers in the message's own style."""

from __future__ import annotations

import pytest

from popbox.auth.base import UserRecord
from popbox.config import QuotaSettings
from popbox.delivery.deliverer import Deliverer, trace_headers
from popbox.errors import (
    MessageTooBig,
    NoSuchMailbox,
    QuotaExceeded,
    TemporaryDeliveryError,
    UnknownRecipient,
)
from popbox.store.memory import MemoryStore
from popbox.wireform import wire_size
from support.lmtp import make_config, users


async def test_lf_message_gets_lf_trace_headers() -> None:
    store = MemoryStore()
    deliverer = Deliverer(make_config(), store, users("alice"))
    data = b"Subject: lf\n\nbody\n"
    delivered = await deliverer.deliver("alice@example.test", "s@example.net", data)
    drop = await store.open_maildrop("alice")
    stored = b"".join([chunk async for chunk in drop.read_message(0)])
    await drop.release()
    assert stored == b"Return-Path: <s@example.net>\nDelivered-To: alice@example.test\n" + data
    assert delivered.user == "alice"
    assert delivered.size == wire_size(stored)


def test_unknown_sender_writes_no_return_path() -> None:
    assert trace_headers("alice", None, b"x\r\n") == b"Delivered-To: alice\r\n"
    assert trace_headers("alice", "", b"x\n") == b"Return-Path: <>\nDelivered-To: alice\n"


async def test_without_trace_the_message_is_stored_as_given() -> None:
    store = MemoryStore()
    deliverer = Deliverer(make_config(), store, users("alice"))
    await deliverer.deliver("alice", "s@example.net", b"Return-Path: <x>\n\nhi\n", add_trace=False)
    assert (await store.usage("alice")).octets == wire_size(b"Return-Path: <x>\n\nhi\n")


async def test_unknown_user_and_too_big() -> None:
    deliverer = Deliverer(make_config(max_message_size=10), MemoryStore(), users("alice"))
    with pytest.raises(UnknownRecipient):
        await deliverer.deliver("nobody@example.test", "s", b"x\n")
    with pytest.raises(MessageTooBig):
        await deliverer.deliver("alice@example.test", "s", b"x" * 11)


async def test_quota_counts_the_trace_headers_and_wire_size() -> None:
    # The stored message is what counts, headers included, in CRLF octets.
    data = b"a\nb\n"
    stored_size = wire_size(trace_headers("alice", "s", data) + data)
    store = MemoryStore()
    exact = make_config(quota=QuotaSettings(octets=stored_size))
    await Deliverer(exact, store, users("alice")).deliver("alice", "s", data)
    with pytest.raises(QuotaExceeded) as raised:
        await Deliverer(exact, store, users("alice")).deliver("alice", "s", data)
    assert not raised.value.permanent


async def test_per_user_rules_win_and_zero_is_unlimited() -> None:
    config = make_config(quota=QuotaSettings(messages=1, octets=10, over_quota="permanent"))
    passdb = users(
        "capped",
        free=UserRecord("free", quota_messages=0, quota_octets=0),
        two=UserRecord("two", quota_messages=2, quota_octets=0),
    )
    deliverer = Deliverer(config, MemoryStore(), passdb)
    for _ in range(3):
        await deliverer.deliver("free", "s", b"x" * 100)
    await deliverer.deliver("two", "s", b"x")
    await deliverer.deliver("two", "s", b"x")
    with pytest.raises(QuotaExceeded) as raised:
        await deliverer.deliver("two", "s", b"x")
    assert raised.value.permanent
    # The default octet rule (10) stops even the first message for "capped".
    with pytest.raises(QuotaExceeded):
        await deliverer.deliver("capped", "s", b"x")


class _FaultyStore(MemoryStore):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self._error = error

    async def deliver(self, user: str, message: bytes, **options: object) -> str:
        raise self._error


@pytest.mark.parametrize("error", [NoSuchMailbox("gone"), OSError(28, "No space left")])
async def test_storage_faults_become_temporary(error: Exception) -> None:
    deliverer = Deliverer(make_config(), _FaultyStore(error), users("alice"))
    with pytest.raises(TemporaryDeliveryError) as raised:
        await deliverer.deliver("alice", "s", b"x\n")
    assert raised.value.__cause__ is error


async def test_store_quota_verdict_passes_through() -> None:
    # A store that enforces quotas itself (PostgreSQL) is believed as it is.
    store = _FaultyStore(QuotaExceeded("full", permanent=True))
    with pytest.raises(QuotaExceeded):
        await Deliverer(make_config(), store, users("alice")).deliver("alice", "s", b"x\n")
