"""PopboxStoreSink: exactly one copy in the maildrop whatever crash came before, delivered
by the server's rules (quota, trace headers, recipient mapping)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from popbox.auth.base import UserRecord
from popbox.auth.memory import MemoryPassDB
from popbox.collector.base import FetchedMessage
from popbox.collector.sinks.popbox_store import DeliveryLedger, PopboxStoreSink
from popbox.config import Config, QuotaSettings
from popbox.delivery.deliverer import Deliverer
from popbox.errors import (
    PermanentSinkError,
    PermanentStoreError,
    QuotaExceeded,
    StoreError,
    TemporarySinkError,
)
from popbox.store.base import MailStore
from popbox.store.memory import MemoryStore
from support.fakepop import FakePop
from support.fetch import account_entry, fetch_settings, write_fetch_config
from support.maildrop import stored_messages

RAW = b"From: a@example.org\r\nSubject: once\r\n\r\nbody line\r\n"
# What the sink stores: the message as fetched, with the Delivered-To trace header
# written for the popbox user (POP3 gives no envelope sender, so no Return-Path).
TRACE = b"Delivered-To: alice\r\n"


def _fetched(tmp_path: Path, raw: bytes = RAW, uidl: str = "U1") -> FetchedMessage:
    path = tmp_path / f"{uidl}.eml"
    path.write_bytes(raw)
    return FetchedMessage("acct", uidl, len(raw), hashlib.sha256(raw).hexdigest(), path)


def _deliverer(store: MailStore, **quota: Any) -> Deliverer:
    config = Config(quota=QuotaSettings(**quota))
    users = MemoryPassDB(
        {"alice": "x", "full": "x"}, {"full": UserRecord("full", quota_messages=1)}
    )
    return Deliverer(config, store, users)


def _sink(store: MailStore, ledger_path: Path, **quota: Any) -> PopboxStoreSink:
    return PopboxStoreSink(_deliverer(store, **quota), "alice", ledger_path=ledger_path)


async def test_delivers_once_per_idempotency_key(tmp_path: Path) -> None:
    store = MemoryStore()
    sink = _sink(store, tmp_path / "ledger.sqlite")
    message = _fetched(tmp_path)
    await sink.deliver(message)
    await sink.deliver(message)  # the collector crashed before recording it
    await sink.deliver(_fetched(tmp_path, RAW + b"more\r\n", uidl="U2"))
    assert await stored_messages(store, "alice") == [TRACE + RAW, TRACE + RAW + b"more\r\n"]


async def test_trace_keeps_the_return_path_of_the_first_delivery(tmp_path: Path) -> None:
    # A message from a remote maildrop carries the Return-Path its own delivery wrote;
    # it stays the only one, and Delivered-To names the local user it went to.
    store = MemoryStore()
    raw = b"Return-Path: <list@example.org>\r\n" + RAW
    await _sink(store, tmp_path / "ledger.sqlite").deliver(_fetched(tmp_path, raw))
    [stored] = await stored_messages(store, "alice")
    assert stored == TRACE + raw
    assert stored.count(b"Return-Path:") == 1


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
    # What a SIGKILL between the store write and the ledger update leaves behind: the
    # message stored as the Deliverer stores it (trace header first), the row pending.
    DeliveryLedger(ledger_path).mark("popbox:alice", message.idempotency_key, "pending")
    await store.deliver("alice", (TRACE + RAW).replace(b"\r\n", b"\n"))

    sink = _sink(store, ledger_path)
    await sink.deliver(message)
    assert len(await stored_messages(store, "alice")) == 1
    assert DeliveryLedger(ledger_path).state("popbox:alice", message.idempotency_key) == (
        "delivered"
    )


async def test_the_same_message_for_another_user_is_no_stored_copy(
    store: MailStore, tmp_path: Path
) -> None:
    # After a crash the search looks for the message as it would have been stored here;
    # a copy without this user's trace header (delivered by another way) does not count.
    ledger_path = tmp_path / "ledger.sqlite"
    message = _fetched(tmp_path)
    DeliveryLedger(ledger_path).mark("popbox:alice", message.idempotency_key, "pending")
    await store.deliver("alice", b"Delivered-To: bob\r\n" + RAW)

    await _sink(store, ledger_path).deliver(message)
    assert (await stored_messages(store, "alice"))[-1] == TRACE + RAW


async def test_crash_before_store_write_delivers(tmp_path: Path) -> None:
    store = MemoryStore()
    ledger_path = tmp_path / "ledger.sqlite"
    message = _fetched(tmp_path)
    DeliveryLedger(ledger_path).mark("popbox:alice", message.idempotency_key, "pending")
    await store.deliver("alice", b"Subject: another message of the same size!!\r\n\r\n")

    await _sink(store, ledger_path).deliver(message)
    assert (await stored_messages(store, "alice"))[-1] == TRACE + RAW


async def test_unknown_outcome_while_maildrop_is_in_use_is_temporary(tmp_path: Path) -> None:
    store = MemoryStore()
    ledger_path = tmp_path / "ledger.sqlite"
    message = _fetched(tmp_path)
    DeliveryLedger(ledger_path).mark("popbox:alice", message.idempotency_key, "pending")
    session = await store.open_maildrop("alice")  # a POP3 client is logged in
    try:
        sink = _sink(store, ledger_path)
        with pytest.raises(TemporarySinkError, match="busy"):
            await sink.deliver(message)
    finally:
        await session.release()
    await sink.deliver(message)
    assert await stored_messages(store, "alice") == [TRACE + RAW]


@pytest.mark.parametrize(
    ("policy", "outcome"),
    [("permanent", PermanentSinkError), ("temporary", TemporarySinkError)],
)
async def test_over_quota_follows_quota_over_quota(
    tmp_path: Path, policy: str, outcome: type[Exception]
) -> None:
    store = MemoryStore()
    await store.deliver("full", b"Subject: already here\r\n\r\nold\r\n")
    sink = PopboxStoreSink(
        _deliverer(store, over_quota=policy), "full", ledger_path=tmp_path / "l.sqlite"
    )
    with pytest.raises(outcome, match="quota"):
        await sink.deliver(_fetched(tmp_path))
    assert len(await stored_messages(store, "full")) == 1
    # The default quota of [quota] applies as well, trace header included in the size.
    exact = len(TRACE + RAW)
    for octets, fits in ((exact, True), (exact - 1, False)):
        other = MemoryStore()
        sink = _sink(other, tmp_path / f"q{octets}.sqlite", octets=octets)
        if fits:
            await sink.deliver(_fetched(tmp_path))
        else:
            with pytest.raises(TemporarySinkError, match="quota"):
                await sink.deliver(_fetched(tmp_path))


async def test_no_such_popbox_user_is_permanent(tmp_path: Path) -> None:
    store = MemoryStore()
    sink = PopboxStoreSink(_deliverer(store), "nobody", ledger_path=tmp_path / "l.sqlite")
    with pytest.raises(PermanentSinkError, match="no such user"):
        await sink.deliver(_fetched(tmp_path))


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
        (PermanentStoreError("read-only"), PermanentSinkError),
        (StoreError("disk hiccup"), TemporarySinkError),
        (OSError(28, "No space left"), TemporarySinkError),
    ],
)
async def test_store_errors_map_to_sink_outcomes(
    tmp_path: Path, error: Exception, outcome: type[Exception]
) -> None:
    sink = _sink(_FailingStore(error), tmp_path / "l.sqlite")
    with pytest.raises(outcome):
        await sink.deliver(_fetched(tmp_path))


def _install_server(tmp_path: Path) -> Path:
    """An installed popbox server: its data dir with a passwd file (bob) and Maildir root.
    Returns the config file path; the caller writes it."""
    (tmp_path / "data" / "mail").mkdir(parents=True)
    passwd = tmp_path / "data" / "passwd"
    passwd.write_text("bob:{PLAIN}secret::::::\n")
    passwd.chmod(0o600)
    return tmp_path / "popbox.toml"


SERVER_SETTINGS = 'data_dir = "data"\n\n[pop3]\nlisten = []\n\n'


async def _maildir_messages(root: Path, user: str) -> list[bytes]:
    from popbox.store.maildir import MaildirStore

    store = MaildirStore(root)
    try:
        return await stored_messages(store, user)
    finally:
        await store.close()


def _popbox_account(
    port: int, tmp_path: Path, config: str | None = None, **fields: Any
) -> dict[str, Any]:
    """An account whose one sink is popbox user bob (of the server ``config`` names)."""
    sink = {"kind": "popbox", "user": "bob"} | ({} if config is None else {"config": config})
    return account_entry(port, tmp_path, sinks=[sink], **fields)


async def test_built_from_settings_into_a_real_maildir(tmp_path: Path) -> None:
    pytest.importorskip("popbox.store.maildir")
    from popbox.backends import open_local_delivery
    from popbox.collector.sinks import SinkContext, build_sink

    server_config = _install_server(tmp_path)
    server_config.write_text(SERVER_SETTINGS)
    settings = fetch_settings(tmp_path, _popbox_account(1, tmp_path, config=str(server_config)))
    account = settings.accounts[0]
    context = SinkContext(account, settings, local_delivery=open_local_delivery)
    sink: Any = build_sink(account.sinks[0], context)
    message = _fetched(tmp_path)
    try:
        assert sink.name == "popbox:bob"
        await sink.deliver(message)
        await sink.deliver(message)
    finally:
        await sink.close()
    stored = await _maildir_messages(tmp_path / "data" / "mail", "bob")
    # Stored with CRLF (storage.save_crlf), Delivered-To first.
    assert stored == [b"Delivered-To: bob\r\n" + RAW]
    assert (tmp_path / "state" / "popbox-sink.sqlite").exists()


def test_without_a_server_config_the_sink_says_which_key_to_set(tmp_path: Path) -> None:
    from popbox.collector.sinks import SinkContext, build_sink
    from popbox.errors import ConfigError

    settings = fetch_settings(tmp_path, _popbox_account(1, tmp_path))
    account = settings.accounts[0]
    with pytest.raises(ConfigError, match="set `config`"):
        build_sink(account.sinks[0], SinkContext(account, settings))


def test_without_the_composition_root_there_is_no_popbox_sink(tmp_path: Path) -> None:
    # The collector cannot open a popbox store itself; only `popbox fetch` hands it one.
    from popbox.collector.sinks import SinkContext, build_sink
    from popbox.errors import ConfigError

    account = _popbox_account(1, tmp_path, config=str(tmp_path / "popbox.toml"))
    settings = fetch_settings(tmp_path, account)
    with pytest.raises(ConfigError, match="popbox fetch"):
        build_sink(settings.accounts[0].sinks[0], SinkContext(settings.accounts[0], settings))


async def _run(*command: str) -> tuple[int, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command,
        env=dict(os.environ, FAKE_PASSWORD="secret"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, err


async def test_popbox_fetch_delivers_through_the_server_rules(tmp_path: Path) -> None:
    """`popbox fetch` as documented, end to end: one config file names the server and
    the account; the popbox sink gets the server's Deliverer from the composition root."""
    messages = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)]
    fake = await FakePop(list(messages)).start()
    try:
        config = _install_server(tmp_path)
        account = _popbox_account(
            fake.port,
            tmp_path,
            config="popbox.toml",
            security="none",
            allow_plaintext_password=True,
            password_env="FAKE_PASSWORD",
        )
        write_fetch_config(config, account, before=SERVER_SETTINGS, state_dir="state")
        code, err = await _run("-m", "popbox", "fetch", "--config", str(config))
        assert code == 0, err
        # The standalone module has no composition root, so no way into popbox: it
        # says so as a configuration error instead of opening the store itself.
        code, err = await _run("-m", "popbox.collector.cli", "--config", str(config))
        assert code == 2
        assert b"popbox fetch" in err
    finally:
        await fake.stop()
    stored = await _maildir_messages(tmp_path / "data" / "mail", "bob")
    assert sorted(stored) == sorted(b"Delivered-To: bob\r\n" + raw for raw in messages)
