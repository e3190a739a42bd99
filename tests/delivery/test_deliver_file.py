"""Mail that comes as a file (the collector's): the delivery rules, streamed into the
store, and found again in the maildrop when a crash left the outcome unknown."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.config import QuotaSettings
from popbox.delivery import spooled
from popbox.delivery.deliverer import Deliverer
from popbox.delivery.spooled import measure_file, prefixed
from popbox.errors import MaildropInUse, MessageTooBig, QuotaExceeded, UnknownRecipient
from popbox.store.base import MailStore
from popbox.store.maildir import MaildirStore
from popbox.store.memory import MemoryStore
from popbox.wireform import wire_size
from support.lmtp import make_config, users
from support.maildrop import stored_messages as stored

CRLF = b"From: a@example.org\r\nSubject: fetched\r\n\r\nbody\r\n"


@pytest.fixture(params=["memory", "maildir"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MailStore]:
    """A store that takes bytes (MemoryStore) and one that streams files (Maildir)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    real = MaildirStore(tmp_path / "mail", save_crlf=True)
    try:
        yield real
    finally:
        await real.close()


def spool(tmp_path: Path, data: bytes, name: str = "m.eml") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def test_delivered_to_is_written_and_the_file_is_left_as_it_is(
    store: MailStore, tmp_path: Path
) -> None:
    path = spool(tmp_path, CRLF)
    delivered = await Deliverer(make_config(), store, users("alice")).deliver_file(
        "alice", None, path
    )
    assert await stored(store, "alice") == [b"Delivered-To: alice\r\n" + CRLF]
    assert delivered.size == wire_size(b"Delivered-To: alice\r\n" + CRLF)
    assert path.read_bytes() == CRLF


@pytest.mark.parametrize(
    ("sender", "message", "trace"),
    [
        # A known sender and no Return-Path yet: written, as LMTP writes it.
        ("s@example.net", CRLF, b"Return-Path: <s@example.net>\r\nDelivered-To: alice\r\n"),
        # The message already has the Return-Path of its first delivery: one is enough.
        ("s@example.net", b"Return-Path: <x@y>\r\n" + CRLF, b"Delivered-To: alice\r\n"),
        # LF line ends: the trace follows the message's own style.
        (None, CRLF.replace(b"\r\n", b"\n"), b"Delivered-To: alice\n"),
    ],
)
async def test_return_path_only_when_the_sender_is_known_and_none_is_there(
    tmp_path: Path, sender: str | None, message: bytes, trace: bytes
) -> None:
    store = MemoryStore()
    await Deliverer(make_config(), store, users("alice")).deliver_file(
        "alice", sender, spool(tmp_path, message)
    )
    assert await stored(store, "alice") == [trace + message]


async def test_the_delivery_rules_apply(tmp_path: Path) -> None:
    path = spool(tmp_path, CRLF)
    with pytest.raises(UnknownRecipient):
        await Deliverer(make_config(), MemoryStore(), users("alice")).deliver_file(
            "nobody", None, path
        )
    small = make_config(max_message_size=len(CRLF) - 1)
    with pytest.raises(MessageTooBig):
        await Deliverer(small, MemoryStore(), users("alice")).deliver_file("alice", None, path)
    # The quota counts the trace header too.
    exact = wire_size(b"Delivered-To: alice\r\n" + CRLF)
    tight = make_config(quota=QuotaSettings(octets=exact - 1, over_quota="permanent"))
    with pytest.raises(QuotaExceeded) as raised:
        await Deliverer(tight, MemoryStore(), users("alice")).deliver_file("alice", None, path)
    assert raised.value.permanent
    roomy = make_config(quota=QuotaSettings(octets=exact))
    await Deliverer(roomy, MemoryStore(), users("alice")).deliver_file("alice", None, path)


async def test_a_large_file_streams_into_the_maildir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pieces smaller than a line, so CR and LF fall into different pieces.
    monkeypatch.setattr(spooled, "READ_OCTETS", 1000)
    body = b"".join(b"line %06d with some text\r\n" % i for i in range(20_000))
    data = b"Subject: big\r\n\r\n" + body
    store = MaildirStore(tmp_path / "mail", save_crlf=True)
    try:
        deliverer = Deliverer(make_config(), store, users("alice"))
        delivered = await deliverer.deliver_file("alice", None, spool(tmp_path, data))
        assert (await store.usage("alice")).octets == delivered.size
        assert await stored(store, "alice") == [b"Delivered-To: alice\r\n" + data]
    finally:
        await store.close()


async def test_holds_finds_the_copy_deliver_file_stored(
    store: MailStore, tmp_path: Path
) -> None:
    deliverer = Deliverer(make_config(), store, users("alice", "bob"))
    path = spool(tmp_path, CRLF)
    assert not await deliverer.holds("alice", None, path)
    await deliverer.deliver_file("alice", None, path)
    assert await deliverer.holds("alice", None, path)
    # The copy is recognised as it was stored for this recipient, trace included.
    await store.deliver("bob", CRLF)
    assert not await deliverer.holds("bob", None, path)
    session = await store.open_maildrop("alice")  # a POP3 client is logged in
    try:
        with pytest.raises(MaildropInUse):
            await deliverer.holds("alice", None, path)
    finally:
        await session.release()


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300) | st.lists(st.sampled_from([b"\r", b"\n", b"a", b"."])).map(
        b"".join
    ),
    piece=st.integers(min_value=1, max_value=7),
)
def test_measured_wire_size_is_the_wire_size(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, piece: int
) -> None:
    path = tmp_path_factory.mktemp("m") / "m.eml"
    path.write_bytes(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spooled, "READ_OCTETS", piece)
        measured = measure_file(path)
    assert (measured.octets, measured.wire_size) == (len(data), wire_size(data))
    assert measured.head == data[: spooled.HEAD_OCTETS]


@pytest.mark.parametrize("read_size", [1, 3, 64 * 1024])
def test_prefixed_reads_the_prefix_then_the_rest(read_size: int) -> None:
    source = io.BytesIO(b"ignored|the rest")
    source.read(8)
    stream = prefixed(b"Delivered-To: a\r\n", source)
    out = b"".join(iter(lambda: stream.read(read_size), b""))
    assert out == b"Delivered-To: a\r\nthe rest"
