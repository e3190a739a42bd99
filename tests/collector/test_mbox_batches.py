"""The mbox sink: the envelope sender in the From line, whole batches under one lock,
and a batch cut short by a crash repaired without losing or doubling an entry."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from popbox.collector.base import BatchSink, FetchedMessage
from popbox.collector.config import MboxSinkSettings
from popbox.collector.sinks.mbox import (
    LINE_PIECE,
    MboxSink,
    envelope_sender,
    mboxrd_bytes,
    mboxrd_pieces,
)

ENTRY_START = re.compile(rb"(?m)^From (\S+) [A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d [\d:]{8} \d{4}\n")


def fetched(data: bytes, uidl: str, tmp_path: Path | None = None) -> FetchedMessage:
    """A message held in memory (a batch's small body) or, with ``tmp_path``, spooled."""
    digest = hashlib.sha256(data).hexdigest()
    if tmp_path is None:
        return FetchedMessage("acct", uidl, len(data), digest, Path("/nonexistent"), data)
    path = tmp_path / f"spool-{uidl}"
    path.write_bytes(data)
    return FetchedMessage("acct", uidl, len(data), digest, path)


def sample(index: int) -> bytes:
    return (
        f"Return-Path: <bounce{index}@lists.example>\r\nFrom: Someone <s{index}@example.com>\r\n"
        f"Subject: {index}\r\n\r\nFrom the start\r\n>From quoted\r\nline {index}\r\n"
    ).encode()


def entries(mbox: Path) -> list[tuple[bytes, bytes]]:
    """(sender, message with CRLF line ends, quoting undone) for each entry, in order."""
    parts = ENTRY_START.split(mbox.read_bytes())
    assert parts[0] == b""
    found = []
    for sender, body in zip(parts[1::2], parts[2::2], strict=True):
        assert body.endswith(b"\n\n")
        unquoted = re.sub(rb"(?m)^>(>*From )", rb"\1", body[:-1])
        found.append((sender, unquoted.replace(b"\n", b"\r\n")))
    return found


def test_the_from_line_names_return_path_else_from_else_mailer_daemon() -> None:
    assert envelope_sender(sample(1)) == "bounce1@lists.example"
    assert envelope_sender(b"Return-Path: <>\r\nFrom: A <a@x.org>\r\n\r\n") == "a@x.org"
    folded = b'Subject: s\r\nFrom: "Long, Name"\r\n <folded@x.org>\r\n\r\nFrom: b@y\r\n'
    assert envelope_sender(folded) == "folded@x.org"
    # Only the header block counts, and nothing that is not one word.
    assert envelope_sender(b"Subject: s\r\n\r\nReturn-Path: <late@x.org>\r\n") == "MAILER-DAEMON"
    assert envelope_sender(b"From: undisclosed recipients\r\n\r\n") == "MAILER-DAEMON"


@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"From ", b">", b"x", b" "])).map(b"".join))
def test_quoting_in_memory_matches_the_streamed_quoting(data: bytes) -> None:
    assert mboxrd_bytes(data) == b"".join(mboxrd_pieces(io.BytesIO(data)))


def test_quoting_of_lines_longer_than_a_piece_matches_too() -> None:
    data = b"a" * (LINE_PIECE - 1) + b"\r\nFrom x\r\n" + b"b" * (3 * LINE_PIECE) + b"\r\nFrom y"
    assert mboxrd_bytes(data) == b"".join(mboxrd_pieces(io.BytesIO(data)))


async def test_a_batch_is_appended_whole_and_a_repeat_adds_nothing(tmp_path: Path) -> None:
    mbox = tmp_path / "mail.mbox"
    sink = MboxSink(MboxSinkSettings(kind="mbox", path=mbox))
    assert isinstance(sink, BatchSink)
    batch = [fetched(sample(i), f"u{i}") for i in range(5)]
    # A big message streams from its spool file; the others are held in memory.
    big = sample(5) + b"z" * 100 + b"\r\n"
    batch.append(fetched(big, "u5", tmp_path))
    await sink.deliver_batch(batch)
    assert entries(mbox) == [
        (f"bounce{i}@lists.example".encode(), m.read_bytes()) for i, m in enumerate(batch)
    ]
    before = mbox.read_bytes()
    await sink.deliver_batch(batch)
    await sink.deliver(batch[2])
    assert mbox.read_bytes() == before
    assert not mbox.with_name(mbox.name + ".lock").exists()


async def test_a_batch_cut_short_by_a_crash_is_repaired_entry_by_entry(
    tmp_path: Path,
) -> None:
    mbox = tmp_path / "mail.mbox"
    sidecar = mbox.with_name(mbox.name + ".popbox-recent")
    sink = MboxSink(MboxSinkSettings(kind="mbox", path=mbox))
    first = [fetched(sample(i), f"u{i}") for i in range(3)]
    await sink.deliver_batch(first)
    batch = [fetched(sample(i), f"u{i}") for i in range(3, 9)]
    await sink.deliver_batch(batch)
    whole = mbox.read_bytes()
    records = json.loads(sidecar.read_text())
    # Killed in the middle of the fourth entry of the batch: its sidecar records
    # were written (without lengths), the file holds three entries and a half.
    pending = records[-len(batch) :]
    for record in pending:
        record["length"] = None
    sidecar.write_text(json.dumps(records))
    cut = pending[3]["offset"] + 30
    mbox.write_bytes(whole[:cut])
    # The next run offers the failed batch again, message by message.
    for message in batch:
        await sink.deliver(message)
    assert mbox.read_bytes()[: pending[3]["offset"]] == whole[: pending[3]["offset"]]
    assert [body for _, body in entries(mbox)] == [m.read_bytes() for m in first + batch]


async def test_an_append_finished_before_its_bookkeeping_is_not_written_again(
    tmp_path: Path,
) -> None:
    mbox = tmp_path / "mail.mbox"
    sidecar = mbox.with_name(mbox.name + ".popbox-recent")
    sink = MboxSink(MboxSinkSettings(kind="mbox", path=mbox))
    batch = [fetched(sample(i), f"u{i}") for i in range(4)]
    await sink.deliver_batch(batch)
    whole = mbox.read_bytes()
    records = json.loads(sidecar.read_text())
    for record in records:
        record["length"] = None
    sidecar.write_text(json.dumps(records))
    await sink.deliver_batch(batch)
    assert mbox.read_bytes() == whole
    assert all(record["length"] for record in json.loads(sidecar.read_text()))


async def test_batches_of_two_sinks_on_one_file_do_not_interleave(tmp_path: Path) -> None:
    mbox = tmp_path / "mail.mbox"
    sinks = [MboxSink(MboxSinkSettings(kind="mbox", path=mbox)) for _ in range(2)]
    batches = [[fetched(sample(100 * s + i), f"s{s}-{i}") for i in range(20)] for s in range(2)]
    await asyncio.gather(*(s.deliver_batch(b) for s, b in zip(sinks, batches, strict=True)))
    bodies = [body for _, body in entries(mbox)]
    assert sorted(bodies) == sorted(m.read_bytes() for b in batches for m in b)
    # Each batch is one run of entries.
    firsts = [bodies.index(b[0].read_bytes()) for b in batches]
    assert sorted(firsts) == [0, 20]
