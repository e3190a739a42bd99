"""PopboxStoreSink: exactly one copy in the maildrop whatever crash came before."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.base import FetchedMessage
from popbox.collector.sinks.popbox_store import DeliveryLedger, PopboxStoreSink
from popbox.errors import (
    PermanentSinkError,
    QuotaExceeded,
    StoreError,
    TemporarySinkError,
)
from popbox.store.base import MailStore
from popbox.store.memory import MemoryStore

RAW = b"From: a@example.org\r\nSubject: once\r\n\r\nbody line\r\n"


def _fetched(tmp_path: Path, raw: bytes = RAW, uidl: str = "U1") -> FetchedMessage:
    path = tmp_path / f"{uidl}.eml"
    path.write_bytes(raw)
    return FetchedMessage("acct", uidl, len(raw), hashlib.sha256(raw).hexdigest(), path)


async def _stored(store: MailStore, user: str) -> list[bytes]:
    maildrop = await store.open_maildrop(user)
    try:
        return [
            b"".join([chunk async for chunk in maildrop.read_message(i)])
            for i in range(len(maildrop.messages))
        ]
    finally:
        await maildrop.release()


async def test_delivers_once_per_idempotency_key(tmp_path: Path) -> None:
    store = MemoryStore()
    sink = PopboxStoreSink(store, "alice", ledger_path=tmp_path / "ledger.sqlite")
    message = _fetched(tmp_path)
    await sink.deliver(message)
    await sink.deliver(message)  # the collector crashed before recording it
    await sink.deliver(_fetched(tmp_path, RAW + b"more\r\n", uidl="U2"))
    assert await _stored(store, "alice") == [RAW, RAW + b"more\r\n"]


@pytest.fixture(params=["memory", "maildir"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MailStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    maildir = pytest.importorskip("popbox.store.maildir")
    (tmp_path / "mail").mkdir()
    real: MailStore = maildir.MaildirStore(tmp_path / "mail")
    try:
        yield real
    finally:
        await real.close()


async def test_crash_after_store_write_is_not_duplicated(
    store: MailStore, tmp_path: Path
) -> None:
    ledger_path = tmp_path / "ledger.sqlite"
    message = _fetched(tmp_path)
    # What a SIGKILL between the store write and the ledger update leaves behind.
    DeliveryLedger(ledger_path).mark("popbox:alice", message.idempotency_key, "pending")
    await store.deliver("alice", RAW.replace(b"\r\n", b"\n"))

    sink = PopboxStoreSink(store, "alice", ledger_path=ledger_path)
    await sink.deliver(message)
    assert len(await _stored(store, "alice")) == 1
    assert DeliveryLedger(ledger_path).state("popbox:alice", message.idempotency_key) == (
        "delivered"
    )


async def test_crash_before_store_write_delivers(tmp_path: Path) -> None:
    store = MemoryStore()
    ledger_path = tmp_path / "ledger.sqlite"
    message = _fetched(tmp_path)
    DeliveryLedger(ledger_path).mark("popbox:alice", message.idempotency_key, "pending")
    await store.deliver("alice", b"Subject: another message of the same size!!\r\n\r\n")

    await PopboxStoreSink(store, "alice", ledger_path=ledger_path).deliver(message)
    assert (await _stored(store, "alice"))[-1] == RAW


async def test_unknown_outcome_while_maildrop_is_in_use_is_temporary(tmp_path: Path) -> None:
    store = MemoryStore()
    ledger_path = tmp_path / "ledger.sqlite"
    message = _fetched(tmp_path)
    DeliveryLedger(ledger_path).mark("popbox:alice", message.idempotency_key, "pending")
    session = await store.open_maildrop("alice")  # a POP3 client is logged in
    try:
        sink = PopboxStoreSink(store, "alice", ledger_path=ledger_path)
        with pytest.raises(TemporarySinkError, match="busy"):
            await sink.deliver(message)
    finally:
        await session.release()
    await sink.deliver(message)
    assert await _stored(store, "alice") == [RAW]


class _FailingStore(MemoryStore):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def deliver(self, user: str, message: bytes) -> str:
        raise self.error


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (QuotaExceeded("full", permanent=True), PermanentSinkError),
        (QuotaExceeded("full for now"), TemporarySinkError),
        (StoreError("disk hiccup"), TemporarySinkError),
    ],
)
async def test_store_errors_map_to_sink_outcomes(
    tmp_path: Path, error: Exception, outcome: type[Exception]
) -> None:
    sink = PopboxStoreSink(_FailingStore(error), "alice", ledger_path=tmp_path / "l.sqlite")
    with pytest.raises(outcome):
        await sink.deliver(_fetched(tmp_path))


async def test_built_from_settings_into_a_real_maildir(tmp_path: Path) -> None:
    pytest.importorskip("popbox.store.maildir")
    from popbox.collector.config import fetch_settings_from_dict
    from popbox.collector.sinks import SinkContext, build_sink
    from popbox.store.maildir import MaildirStore

    server_config = tmp_path / "popbox.toml"
    server_config.write_text('data_dir = "data"\n')
    (tmp_path / "data" / "mail").mkdir(parents=True)  # an installed server has its root
    settings = fetch_settings_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "accounts": [
                {
                    "name": "remote",
                    "host": "pop.example.org",
                    "username": "u",
                    "password_env": "UNUSED",
                    "sinks": [{"kind": "popbox", "user": "bob", "config": str(server_config)}],
                }
            ],
        },
        tmp_path,
    )
    account = settings.accounts[0]
    sink: Any = build_sink(account.sinks[0], SinkContext(account, settings))
    message = _fetched(tmp_path)
    try:
        assert sink.name == "popbox:bob"
        await sink.deliver(message)
        await sink.deliver(message)
    finally:
        await sink.close()
    store = MaildirStore(tmp_path / "data" / "mail")
    try:
        stored = await _stored(store, "bob")
    finally:
        await store.close()
    assert [normal.replace(b"\r\n", b"\n") for normal in stored] == [
        RAW.replace(b"\r\n", b"\n")
    ]
    assert (tmp_path / "state" / "popbox-sink.sqlite").exists()


def test_without_a_server_config_the_sink_says_which_key_to_set(tmp_path: Path) -> None:
    from popbox.collector.config import fetch_settings_from_dict
    from popbox.collector.sinks import SinkContext, build_sink
    from popbox.errors import ConfigError

    settings = fetch_settings_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "accounts": [{
                "name": "remote", "host": "pop.example.org", "username": "u",
                "password_env": "UNUSED", "sinks": [{"kind": "popbox", "user": "bob"}],
            }],
        },
        tmp_path,
    )
    account = settings.accounts[0]
    with pytest.raises(ConfigError, match="set `config`"):
        build_sink(account.sinks[0], SinkContext(account, settings))
