"""The collector state contract (collector/state/base.py): every implementation passes it.

Each contract test runs once per implementation through the parametrized ``state``
fixture; the SQLite state's own promises (durable across reopening, WAL, group commit,
nothing on the event loop's thread) follow at the end.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from popbox.collector.poll import Poller
from popbox.collector.state import CollectorState, Delivered, MemoryState, StateDB
from popbox.collector.state.base import ERROR_TEXT_MAX
from popbox.errors import CollectorError
from support.fakepop import FakePop
from support.fetch import crlf_message, maildir_messages, settings_for
from support.wire import lf


@pytest.fixture(params=["memory", "sqlite"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CollectorState]:
    backend = MemoryState() if request.param == "memory" else StateDB(tmp_path / "state.sqlite")
    yield backend
    backend.close()


async def test_a_listing_remembers_first_sightings_and_their_first_size(
    state: CollectorState,
) -> None:
    assert await state.records("a") == {}
    await state.note_listing("a", [("u1", 100), ("u2", 200)])
    await state.note_listing("a", [("u1", 999)])  # LIST sizes change; the first one stays
    await state.note_listing("a", [])
    records = await state.records("a")
    assert sorted(records) == ["u1", "u2"]
    first = records["u1"]
    assert (first.size, first.attempts, first.delivered_at, first.quarantined) == (
        100,
        0,
        None,
        False,
    )
    assert await state.records("b") == {}


async def test_attempts_count_per_message_and_tell_which_sinks_have_it(
    state: CollectorState,
) -> None:
    [(uid, attempt)] = (await state.start_attempts("a", [("u1", 10)])).items()
    assert (uid, attempt.count, attempt.sinks_done) == ("u1", 1, frozenset())
    uids = [f"u{n}" for n in range(1, 1203)]  # past one IN list's chunk
    await state.record_sinks("a", [("u1", "maildir:x"), ("u1200", "maildir:x"), ("u3", "other")])
    await state.record_sinks("b", [("u2", "maildir:x")])  # another account's is not ours
    attempts = await state.start_attempts("a", [(uid, 10) for uid in uids])
    assert len(attempts) == len(uids)
    assert (attempts["u1"].count, attempts["u2"].count) == (2, 1)
    assert attempts["u1"].sinks_done == {"maildir:x"}
    assert attempts["u2"].sinks_done == frozenset()
    done = await state.sinks_done("a", uids)
    assert done == {"u1": {"maildir:x"}, "u1200": {"maildir:x"}, "u3": {"other"}}
    assert await state.sinks_done("a", []) == {}
    assert (await state.records("a"))["u5"].size == 10


async def test_delivered_records_the_last_sink_and_clears_quarantine_and_error(
    state: CollectorState,
) -> None:
    await state.start_attempts("a", [("u1", 10), ("u2", 20)])
    await state.record_failure("a", "u1", "sink down")
    await state.record_quarantined("a", "u2", "refused", "e" * 64)
    await state.record_delivered(
        [Delivered("a", "u1", "f" * 64, "maildir:x", "hdr:1"), Delivered("a", "u2", "d" * 64)]
    )
    records = await state.records("a")
    for uid, sha in (("u1", "f" * 64), ("u2", "d" * 64)):
        record = records[uid]
        assert record.delivered_at is not None
        assert (record.sha256, record.quarantined, record.last_error) == (sha, False, None)
        assert record.size == (10 if uid == "u1" else 20)
    assert await state.sinks_done("a", ["u1", "u2"]) == {"u1": {"maildir:x"}}
    # Only known messages become delivered; the sink's confirmation is kept regardless.
    await state.record_delivered([Delivered("a", "nobody", "0" * 64, "maildir:x")])
    assert "nobody" not in await state.records("a")
    assert await state.sinks_done("a", ["nobody"]) == {"nobody": {"maildir:x"}}


async def test_concurrent_delivered_records_are_each_durable_when_they_return(
    state: CollectorState,
) -> None:
    await state.start_attempts("a", [(f"u{n}", 1) for n in range(10)])
    await asyncio.gather(
        *(state.record_delivered([Delivered("a", f"u{n}", "0" * 64, "sink")]) for n in range(10))
    )
    records = await state.records("a")
    assert all(records[f"u{n}"].delivered_at is not None for n in range(10))
    assert (await state.sinks_done("a", ["u3"]))["u3"] == {"sink"}


async def test_quarantine_is_listed_until_delivered_and_clearing_resets_the_budget(
    state: CollectorState,
) -> None:
    await state.start_attempts("a", [("u1", 10), ("u2", 10)])
    await state.start_attempts("a", [("u1", 10)])
    await state.record_quarantined("a", "u1", "x" * (ERROR_TEXT_MAX + 50), "a" * 64)
    await state.record_quarantined("a", "u2", "bad", "b" * 64)
    [first, second] = sorted(await state.quarantined("a"), key=lambda record: record.uid)
    assert (first.uid, first.attempts, first.sha256) == ("u1", 2, "a" * 64)
    assert first.last_error == "x" * ERROR_TEXT_MAX
    assert second.last_error == "bad"
    await state.record_delivered([Delivered("a", "u2", "b" * 64)])
    assert [record.uid for record in await state.quarantined("a")] == ["u1"]
    await state.clear_quarantine("a", "u1")
    record = (await state.records("a"))["u1"]
    assert (record.quarantined, record.attempts) == (False, 0)
    assert await state.quarantined("a") == []


async def test_failures_skips_and_deletions_are_kept(state: CollectorState) -> None:
    await state.note_listing("a", [("u1", 10), ("u2", 20)])
    await state.record_failure("a", "u1", "e" * (ERROR_TEXT_MAX + 1))
    await state.record_failure("a", "unknown", "ignored")
    await state.record_skipped("a", "u2", 20, "filter")
    await state.record_skipped("a", "u3", 30, "oversize")  # skipped at first sight
    await state.record_deleted("a", ["u1", "u2"])
    records = await state.records("a")
    assert records["u1"].last_error == "e" * ERROR_TEXT_MAX
    assert (records["u2"].skipped, records["u3"].skipped, records["u3"].size) == (
        "filter",
        "oversize",
        30,
    )
    assert records["u1"].deleted_at is not None
    assert records["u2"].deleted_at is not None
    assert records["u3"].deleted_at is None
    assert "unknown" not in records


async def test_header_uids_adopt_what_was_delivered_under_a_server_uidl(
    state: CollectorState,
) -> None:
    await state.start_attempts("a", [("UIDL-1", 10), ("UIDL-2", 20)])
    await state.record_delivered([Delivered("a", "UIDL-1", "1" * 64, header_uid="hdr:one")])
    # UIDL-2 was never delivered: its header uid is nothing to adopt.
    await state.record_failure("a", "UIDL-2", "down")
    adopted = await state.adopt_header_uids("a", ["hdr:one", "hdr:two", "hdr:one"])
    assert adopted == 1
    records = await state.records("a")
    alias = records["hdr:one"]
    assert alias.delivered_at == records["UIDL-1"].delivered_at
    assert (alias.size, alias.sha256) == (10, "1" * 64)
    assert "hdr:two" not in records
    assert await state.adopt_header_uids("a", ["hdr:one"]) == 0  # known already
    assert await state.adopt_header_uids("b", ["hdr:one"]) == 0  # another account's


async def test_runs_and_status(state: CollectorState) -> None:
    assert [status.failures for status in await state.status(["a"])] == [0]
    await state.run_started("a")
    await state.run_finished("a", error="boom")
    await state.run_finished("a", error="boom again")
    [failed] = await state.status(["a"])
    assert (failed.last_error, failed.failures, failed.last_success) == ("boom again", 2, None)
    assert failed.last_error_at is not None
    await state.start_attempts("a", [("u1", 1), ("u2", 1), ("u3", 1)])
    await state.record_delivered([Delivered("a", "u1", "0" * 64)])
    await state.record_quarantined("a", "u2", "bad", "0" * 64)
    await state.run_started("a")
    await state.run_finished("a", error=None, on_server=3, pending=1)
    [ok, other] = await state.status(["a", "b"])
    assert (ok.account, ok.failures, ok.delivered, ok.quarantined, ok.pending) == ("a", 0, 1, 1, 1)
    assert ok.last_success is not None
    assert ok.last_error == "boom again"  # kept, with its time, for --status to compare
    assert (other.account, other.delivered, other.last_success) == ("b", 0, None)


async def test_a_dead_login_is_remembered_until_a_run_ends_otherwise(
    state: CollectorState,
) -> None:
    await state.run_finished("a", error="sign in again", login_required=True)
    [dead, other] = await state.status(["a", "b"])
    assert (dead.login_required, dead.last_error) == (True, "sign in again")
    assert not other.login_required
    await state.run_finished("a", error="cannot connect")
    assert not (await state.status(["a"]))[0].login_required
    await state.run_finished("a", error="sign in again", login_required=True)
    await state.run_finished("a", error=None)
    assert not (await state.status(["a"]))[0].login_required


async def test_sqlite_state_from_before_dead_logins_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE runs (account TEXT PRIMARY KEY, last_start REAL, last_success REAL,"
        " last_error TEXT, last_error_at REAL, failures INTEGER NOT NULL DEFAULT 0,"
        " on_server INTEGER NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO runs (account, last_error, failures) VALUES ('a', 'boom', 1);"
    )
    old.close()
    db = StateDB(path)
    try:
        [status] = await db.status(["a"])
        assert (status.last_error, status.login_required) == ("boom", False)
        await db.run_finished("a", error="sign in", login_required=True)
        assert (await db.status(["a"]))[0].login_required
    finally:
        db.close()


@pytest.mark.parametrize("sink", ["maildir", "mbox"])
async def test_a_poller_runs_on_any_state_it_is_given(
    state: CollectorState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink: str
) -> None:
    """Batches (Maildir) and one message at a time (mbox): the state given is the
    only memory, so the second poll delivers nothing and deletes what the first delivered."""
    server = await FakePop([crlf_message(n) for n in range(1, 6)]).start()
    try:
        out = tmp_path / "out"
        sinks = [{"kind": sink, "path": str(out)}]
        keep = settings_for(server, tmp_path, monkeypatch, sinks=sinks)
        first = await Poller(keep.accounts[0], keep, state).run()
        assert (first.delivered, first.deleted, first.pending) == (5, 0, 0)
        delete = settings_for(server, tmp_path, monkeypatch, sinks=sinks, delete="after_delivery")
        second = await Poller(delete.accounts[0], delete, state).run()
    finally:
        await server.stop()
    assert (second.delivered, second.deleted, second.on_server) == (0, 5, 5)
    assert server.deleted == {1, 2, 3, 4, 5}
    records = await state.records("fake")
    assert all(r.delivered_at is not None and r.deleted_at is not None for r in records.values())
    assert [status.delivered for status in await state.status(["fake"])] == [5]
    if sink == "maildir":
        assert maildir_messages(out) == sorted(lf(body) for body in server.messages)
    else:
        assert len(re.findall(rb"(?m)^From ", out.read_bytes())) == 5


# ---------------------------------------------------------------- the SQLite state


async def test_sqlite_state_survives_reopen_and_is_durable(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.sqlite")
    assert (await db.start_attempts("a", [("u1", 10)]))["u1"].count == 1
    await db.record_sinks("a", [("u1", "maildir:x")])
    await db.record_delivered([Delivered("a", "u1", "f" * 64)])
    db.close()
    db.close()  # twice is fine
    raw = sqlite3.connect(tmp_path / "s.sqlite")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    again = StateDB(tmp_path / "s.sqlite")
    try:
        assert (await again.records("a"))["u1"].delivered_at is not None
        assert await again.sinks_done("a", ["u1"]) == {"u1": {"maildir:x"}}
        [status] = await again.status(["a"])
        assert status.delivered == 1
    finally:
        again.close()


async def test_sqlite_group_commit_shares_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = StateDB(tmp_path / "s.sqlite")
    batches: list[int] = []
    threads: set[str] = set()
    original = db._record_delivered

    def spy(rows: list[Delivered]) -> None:
        batches.append(len(rows))
        threads.add(threading.current_thread().name)
        original(rows)

    monkeypatch.setattr(db, "_record_delivered", spy)
    try:
        await db.start_attempts("a", [(f"u{n}", 1) for n in range(10)])
        await asyncio.gather(
            *(db.record_delivered([Delivered("a", f"u{n}", "0" * 64, "sink")]) for n in range(10))
        )
        records = await db.records("a")
    finally:
        db.close()
    assert sum(batches) == 10
    assert len(batches) < 10
    assert all(records[f"u{n}"].delivered_at is not None for n in range(10))
    # Commits (fsyncs) happen on the state's thread, never the event loop's.
    assert threading.current_thread().name not in threads


async def test_sqlite_errors_become_collector_errors(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.sqlite")
    try:
        raw = sqlite3.connect(tmp_path / "s.sqlite")
        raw.execute("DROP TABLE messages")
        raw.close()
        with pytest.raises(CollectorError, match="state database"):
            await db.records("a")
        with pytest.raises(CollectorError, match="state database"):
            await db.record_delivered([Delivered("a", "u1", "0" * 64)])
    finally:
        db.close()
