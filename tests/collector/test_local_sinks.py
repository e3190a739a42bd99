"""Maildir, mbox and command sinks: durability shape, idempotency, exit-code mapping."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popbox.collector.base import FetchedMessage
from popbox.collector.config import (
    CommandSinkSettings,
    MaildirSinkSettings,
    MboxSinkSettings,
)
from popbox.collector.sinks.command import CommandSink
from popbox.collector.sinks.maildir import MaildirSink, crlf_to_lf
from popbox.collector.sinks.mbox import MboxSink, mboxrd_lines
from popbox.errors import PermanentSinkError, TemporarySinkError


def fetched(tmp_path: Path, data: bytes, uidl: str = "u1") -> FetchedMessage:
    path = tmp_path / f"spool-{uidl}"
    path.write_bytes(data)
    return FetchedMessage("acct", uidl, len(data), hashlib.sha256(data).hexdigest(), path)


MESSAGE = b"Subject: x\r\n\r\nFrom the start\r\n>From quoted\r\nend\r\n"


async def test_maildir_delivers_lf_into_new_and_skips_a_repeat(tmp_path: Path) -> None:
    box = tmp_path / "box"
    message = fetched(tmp_path, MESSAGE)
    await MaildirSink(MaildirSinkSettings(kind="maildir", path=box)).deliver(message)
    [stored] = list((box / "new").iterdir())
    assert stored.read_bytes() == MESSAGE.replace(b"\r\n", b"\n")
    assert stored.name.endswith(f",S={len(stored.read_bytes())}")
    assert list((box / "tmp").iterdir()) == []
    # A new sink instance (the next run after a crash) finds the key in the name,
    # even once a mail reader moved the file to cur/ with flags.
    stored.rename(box / "cur" / (stored.name + ":2,S"))
    await MaildirSink(MaildirSinkSettings(kind="maildir", path=box)).deliver(message)
    assert len(list((box / "cur").iterdir())) == 1
    assert list((box / "new").iterdir()) == []


async def test_maildir_crlf_split_across_copy_chunks(tmp_path: Path) -> None:
    from popbox.collector.sinks import maildir

    data = b"a" * (maildir.COPY_CHUNK - 1) + b"\r\n" + b"tail\r\n"
    box = tmp_path / "box"
    await MaildirSink(MaildirSinkSettings(kind="maildir", path=box)).deliver(
        fetched(tmp_path, data)
    )
    [stored] = list((box / "new").iterdir())
    assert stored.read_bytes() == data.replace(b"\r\n", b"\n")


@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"\r\r\n", b".", b"x"])).map(b"".join))
def test_crlf_to_lf_changes_only_crlf(data: bytes) -> None:
    assert crlf_to_lf(data) == data.replace(b"\r\n", b"\n")


def test_mboxrd_quoting_reverses(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"From a\r\n>From b\r\n>>From c\r\nFromage\r\nno newline")
    assert b"".join(mboxrd_lines(path)) == (b">From a\n>>From b\n>>>From c\nFromage\nno newline\n")


async def test_mbox_skips_a_complete_repeat_and_repairs_a_cut_short_append(
    tmp_path: Path,
) -> None:
    mbox = tmp_path / "mail.mbox"
    sink = MboxSink(MboxSinkSettings(kind="mbox", path=mbox))
    first = fetched(tmp_path, MESSAGE, "u1")
    await sink.deliver(first)
    size_after_first = mbox.stat().st_size
    await sink.deliver(first)
    assert mbox.stat().st_size == size_after_first
    # Simulate a crash halfway through the second append: the sidecar has the
    # entry without a length and the file ends in a partial entry.
    second = fetched(tmp_path, MESSAGE.replace(b"end", b"second"), "u2")
    await sink.deliver(second)
    whole = mbox.read_bytes()
    sidecar = mbox.with_name(mbox.name + ".popbox-recent")
    entries = json.loads(sidecar.read_text())
    entries[-1]["length"] = None
    sidecar.write_text(json.dumps(entries))
    mbox.write_bytes(whole[: size_after_first + 20])
    await sink.deliver(second)
    repaired = mbox.read_bytes()
    assert repaired[:size_after_first] == whole[:size_after_first]
    # The partial tail is gone; the entry was written once, whole (only the
    # timestamp of its From_ line may differ).
    assert repaired.count(b"From MAILER-DAEMON") == 2
    tail = repaired[size_after_first:].split(b"\n", 1)[1]
    assert tail == whole[size_after_first:].split(b"\n", 1)[1]
    assert not mbox.with_name(mbox.name + ".lock").exists()


async def test_mbox_stale_dotlock_of_a_dead_process_is_broken(tmp_path: Path) -> None:
    mbox = tmp_path / "mail.mbox"
    mbox.with_name("mail.mbox.lock").write_text("999999999\n")
    await MboxSink(MboxSinkSettings(kind="mbox", path=mbox)).deliver(fetched(tmp_path, MESSAGE))
    assert mbox.read_bytes().count(b"From MAILER-DAEMON") == 1


def command_sink(tmp_path: Path, script: str, timeout: float = 10) -> CommandSink:
    path = tmp_path / "sink.sh"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return CommandSink(
        CommandSinkSettings(kind="command", command=str(path), timeout=timeout), "acct"
    )


async def test_command_gets_message_on_stdin_and_the_key_in_env(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = command_sink(tmp_path, f'cat > {out}; echo "$POPBOX_IDEMPOTENCY_KEY" > {out}.key\n')
    message = fetched(tmp_path, MESSAGE)
    await sink.deliver(message)
    assert out.read_bytes() == MESSAGE
    assert out.with_suffix(".key").read_text().strip() == message.idempotency_key


@pytest.mark.parametrize(
    ("status", "error"),
    [(75, TemporarySinkError), (1, PermanentSinkError), (65, PermanentSinkError)],
)
async def test_command_exit_codes(tmp_path: Path, status: int, error: type[Exception]) -> None:
    sink = command_sink(tmp_path, f"cat >/dev/null; echo why >&2; exit {status}\n")
    with pytest.raises(error, match="why"):
        await sink.deliver(fetched(tmp_path, MESSAGE))


async def test_command_timeout_is_temporary_and_kills(tmp_path: Path) -> None:
    sink = command_sink(tmp_path, "exec sleep 30\n", timeout=0.3)
    with pytest.raises(TemporarySinkError, match="no exit"):
        await sink.deliver(fetched(tmp_path, MESSAGE))


async def test_command_noisy_stderr_does_not_deadlock(tmp_path: Path) -> None:
    sink = command_sink(tmp_path, "cat >/dev/null; head -c 300000 /dev/zero >&2; exit 0\n")
    await sink.deliver(fetched(tmp_path, MESSAGE))
