"""Batch delivery (Maildir sinks): a crash at the batch boundary, a batch that fails in
its sink, and bodies kept in memory next to spooled ones."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.base import BatchSink, FetchedMessage
from popbox.collector.config import MaildirSinkSettings, load_fetch_settings
from popbox.collector.pipeline import BATCH_MAX_MESSAGES, BATCHES_IN_FLIGHT, MEMORY_BODY_MAX
from popbox.collector.sinks.maildir import MaildirSink
from popbox.collector.state import StateDB
from popbox.errors import PermanentSinkError, TemporarySinkError
from support.dovecot import DovecotServer
from support.fakepop import FakePop
from support.fetch import (
    account_entry,
    crlf_message,
    maildir_messages,
    message,
    poll,
    settings_for,
    tls_fields,
    write_fetch_config,
)
from support.wire import lf

# Run as a script: a poll whose Maildir sink is SIGKILLed right after the N-th batch is
# in new/ (files fsynced, renamed, directory fsynced) and before the state commit.
KILLED_AFTER_BATCH = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from popbox.collector.config import load_fetch_settings
    from popbox.collector.poll import Poller
    from popbox.collector.sinks import SinkContext, build_sink
    from popbox.collector.state import StateDB

    class KilledAfterBatch:
        def __init__(self, inner, after):
            self.inner, self.after = inner, after

        @property
        def name(self):
            return self.inner.name

        async def deliver(self, message):
            await self.inner.deliver(message)

        async def deliver_batch(self, messages):
            await self.inner.deliver_batch(messages)
            self.after -= 1
            if self.after == 0:
                print(len(messages), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        async def close(self):
            await self.inner.close()

    async def main():
        settings = load_fetch_settings(Path(sys.argv[1]))
        [account] = settings.accounts
        context = SinkContext(account=account, settings=settings)
        sink = KilledAfterBatch(build_sink(account.sinks[0], context), int(sys.argv[2]))
        db = StateDB(settings.state_db_path)
        await Poller(account, settings, db, sinks=[sink]).run()

    asyncio.run(main())
    """
)


@pytest.mark.interop
@pytest.mark.parametrize("kill_after", [1, 2])
def test_kill_between_a_batch_in_new_and_its_state_commit_doubles_nothing(
    dovecot: DovecotServer, tls_files: Any, tmp_path: Path, kill_after: int
) -> None:
    expected = [message(index, b"x" * 76 * (index % 7) + b"\n") for index in range(40)]
    for body in expected:
        dovecot.add_message("alice", body)
    out = tmp_path / "out"
    config = tmp_path / "popbox.toml"
    # The crash suite's account (test_crash.py), without its per-run limit.
    write_fetch_config(
        config,
        account_entry(
            dovecot.pop3s_port,
            out,
            **tls_fields(tls_files.ca),
            delete="after_delivery",
            max_in_flight=4,
        ),
        state_dir=tmp_path / "state",
    )
    harness = tmp_path / "killed.py"
    harness.write_text(KILLED_AFTER_BATCH)
    env = dict(os.environ, POPBOX_TEST_PASSWORD="secret")
    killed = subprocess.run(
        [sys.executable, str(harness), str(config), str(kill_after)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode(errors="replace")
    in_batch = int(killed.stdout)
    # The boundary was hit: the batch's files are in the Maildir, the state knows
    # none of them as delivered and the server still has everything.
    landed = maildir_messages(out)
    assert in_batch >= 1
    assert len(landed) >= in_batch
    settings = load_fetch_settings(config)
    db = StateDB(settings.state_db_path)
    try:
        records = asyncio.run(db.records("alice"))
        delivered = [r for r in records.values() if r.delivered_at is not None]
    finally:
        db.close()
    # The batch's files are not recorded; neither may be those of the batch that was
    # in the sink at the same time (BATCHES_IN_FLIGHT), which the rerun finds too.
    assert len(delivered) <= len(landed) - in_batch
    assert len(dovecot.stored_messages("alice")) == len(expected)
    again = subprocess.run(
        [sys.executable, "-m", "popbox", "fetch", "--config", str(config)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr.decode(errors="replace")[-2000:]
    assert maildir_messages(out) == sorted(expected)
    assert dovecot.stored_messages("alice") == []


class PickyBatchSink:
    """A Maildir that refuses any batch holding a poison message, and the poison
    message itself for good: the rest of the batch must still arrive."""

    def __init__(self, path: Path) -> None:
        self.inner = MaildirSink(MaildirSinkSettings(kind="maildir", path=path))
        self.batches: list[int] = []

    @property
    def name(self) -> str:
        return self.inner.name

    async def deliver(self, message: FetchedMessage) -> None:
        if b"poison" in message.read_bytes():
            raise PermanentSinkError("poison")
        await self.inner.deliver(message)

    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> None:
        self.batches.append(len(messages))
        if any(b"poison" in m.read_bytes() for m in messages):
            raise TemporarySinkError("a poison message in the batch")
        await self.inner.deliver_batch(messages)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def poisoned() -> AsyncIterator[FakePop]:
    bodies = [crlf_message(i) for i in range(1, 6)]
    bodies[2] = bodies[2].replace(b"Subject:", b"X-Poison: poison\r\nSubject:")
    server = await FakePop(bodies).start()
    yield server
    await server.stop()


async def test_a_failed_batch_goes_one_by_one_and_quarantines_only_the_bad_message(
    poisoned: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(poisoned, tmp_path, monkeypatch, delete="after_delivery")
    sink = PickyBatchSink(tmp_path / "out")
    assert isinstance(sink, BatchSink)
    result = await poll(settings, sinks=[sink])
    assert (result.delivered, result.quarantined, result.failed) == (4, 1, 0)
    assert sink.batches  # the batch path was taken
    good = [lf(body) for n, body in enumerate(poisoned.messages, 1) if n != 3]
    assert maildir_messages(tmp_path / "out") == sorted(good)
    assert poisoned.deleted == {1, 2, 4, 5}
    db = StateDB(settings.state_db_path)
    try:
        records = await db.records("fake")
    finally:
        db.close()
    # The batch counted one attempt per message; going one by one did not add another.
    assert {record.attempts for record in records.values()} == {1}
    quarantined = list((settings.quarantine_path / "fake").glob("*.eml"))
    assert [path.read_bytes() for path in quarantined] == [poisoned.messages[2]]
    # Bodies written out for the one-by-one pass are gone again.
    assert list((settings.spool_path / "fake").iterdir()) == []


class OverlapSink:
    """A Maildir whose first batch waits until another batch is in the sink too."""

    def __init__(self, path: Path) -> None:
        self.inner = MaildirSink(MaildirSinkSettings(kind="maildir", path=path))
        self.active = 0
        self.most_active = 0
        self.second = asyncio.Event()
        self.batches: list[int] = []

    @property
    def name(self) -> str:
        return self.inner.name

    async def deliver(self, message: FetchedMessage) -> None:
        await self.inner.deliver(message)

    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> None:
        self.batches.append(len(messages))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if len(self.batches) == 1:
                await asyncio.wait_for(self.second.wait(), 10)
            else:
                self.second.set()
            await self.inner.deliver_batch(messages)
        finally:
            self.active -= 1

    async def close(self) -> None:
        await self.inner.close()


async def test_two_batches_in_the_sink_at_once_deliver_and_delete_each_message_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = [crlf_message(i) for i in range(1, BATCH_MAX_MESSAGES + 40)]
    server = await FakePop(bodies).start()
    try:
        settings = settings_for(server, tmp_path, monkeypatch, delete="after_delivery")
        sink = OverlapSink(tmp_path / "out")
        result = await poll(settings, sinks=[sink])
    finally:
        await server.stop()
    assert sink.most_active == BATCHES_IN_FLIGHT == 2
    assert (result.delivered, result.failed) == (len(bodies), 0)
    assert sum(sink.batches) == len(bodies)
    assert maildir_messages(tmp_path / "out") == sorted(lf(body) for body in bodies)
    assert server.deleted == set(range(1, len(bodies) + 1))


async def test_bodies_in_memory_and_spooled_arrive_byte_exact_in_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = b".dot-led line, stuffed on the wire\r\n"
    big = crlf_message(2) + line * (MEMORY_BODY_MAX // len(line) + 10)
    bodies = [crlf_message(1), big, crlf_message(3)]
    server = await FakePop(bodies).start()
    try:
        settings = settings_for(server, tmp_path, monkeypatch)
        result = await poll(settings)
    finally:
        await server.stop()
    assert result.delivered == 3
    assert maildir_messages(tmp_path / "out") == sorted(lf(body) for body in bodies)
    spool = settings.spool_path / "fake"
    assert list(spool.iterdir()) == []  # nothing left behind in the spool


async def test_maildir_batch_skips_keys_it_holds_and_repeats_within_a_batch(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    messages = []
    for index in range(6):
        data = crlf_message(index)
        path = spool / f"m{index}"
        if index % 2:
            path.write_bytes(data)  # spooled
            messages.append(FetchedMessage("a", f"u{index}", len(data), f"h{index}", path))
        else:  # held in memory, never written to ``path``
            messages.append(FetchedMessage("a", f"u{index}", len(data), f"h{index}", path, data))
    sink = MaildirSink(MaildirSinkSettings(kind="maildir", path=tmp_path / "md"))
    await sink.deliver_batch(messages[:4] + messages[:2])
    await sink.close()
    # A fresh sink (the next run) finds the first four by their keys in new/.
    again = MaildirSink(MaildirSinkSettings(kind="maildir", path=tmp_path / "md"))
    await again.deliver_batch(messages)
    await again.deliver(messages[5])
    await again.close()
    written = maildir_messages(tmp_path / "md")
    assert written == sorted(lf(crlf_message(index)) for index in range(6))
    assert list((tmp_path / "md" / "tmp").iterdir()) == []
    assert all(not (spool / f"m{index}").exists() for index in range(0, 6, 2))
