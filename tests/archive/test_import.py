"""Import into a real archive (SQLite): counts a user can trust (new, already kept,
unreadable), folders as the source had them, large messages and many batches, and an
import run twice keeping everything once."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from popbox.archive.base import Archive, ArchiveSource, MatchAll
from popbox.archive.importer import BATCH_MESSAGES, ImportReport, import_path
from popbox.archive.mboxrd import SPOOL_THRESHOLD
from popbox.archive.sqlite import SqliteArchive
from popbox.errors import ArchiveError


@pytest.fixture
async def archive(tmp_path: Path) -> AsyncIterator[Archive]:
    kept = SqliteArchive(tmp_path / "archive")
    try:
        yield kept
    finally:
        await kept.close()


def _mbox(messages: list[bytes]) -> bytes:
    return b"".join(
        b"From sender@example.org Mon Jan  6 09:00:00 2020\n"
        + message.replace(b"\nFrom ", b"\n>From ")
        + b"\n"
        for message in messages
    )


def _message(n: int, line_end: bytes = b"\n") -> bytes:
    lines = [f"Subject: number {n}", f"Message-ID: <{n}@example.org>", "", f"body {n}"]
    return line_end.join(line.encode() for line in lines) + line_end


async def _folders(archive: Archive, user: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    async for entry in archive.entries(user, MatchAll()):
        assert entry.source is ArchiveSource.IMPORTED
        out.setdefault(entry.folder, []).append(entry.digest)
    return out


def _digest(message: bytes) -> str:
    return hashlib.sha256(message).hexdigest()


async def test_counts_new_already_kept_and_unreadable(archive: Archive, tmp_path: Path) -> None:
    root = tmp_path / "saved"
    root.mkdir()
    (root / "one.eml").write_bytes(_message(1))
    (root / "copy-of-one.eml").write_bytes(_message(1))
    (root / "two.eml").write_bytes(_message(2, b"\r\n"))
    (root / "empty.eml").write_bytes(b"")

    first = await import_path(archive, "alice", root)
    assert (first.new, first.kept, first.unreadable) == (2, 1, 1)
    assert [problem.where for problem in first.problems] == ["empty.eml"]
    assert first.describe() == "2 new, 1 already kept, 1 unreadable"

    again = await import_path(archive, "alice", root)
    assert (again.new, again.kept, again.unreadable) == (0, 3, 1)
    folders = await _folders(archive, "alice")
    assert {folder: sorted(digests) for folder, digests in folders.items()} == {
        "INBOX": sorted([_digest(_message(1)), _digest(_message(2, b"\r\n"))])
    }
    # Another user's import of the same messages is theirs: new for them.
    other = await import_path(archive, "bob", root)
    assert (other.new, other.kept) == (2, 1)


async def test_many_batches_across_folders_keep_every_message_once(
    archive: Archive, tmp_path: Path
) -> None:
    root = tmp_path / "tb"
    (root / "Inbox.sbd").mkdir(parents=True)
    inbox = [_message(n) for n in range(BATCH_MESSAGES + 30)]
    sub = [_message(n) for n in range(1000, 1000 + BATCH_MESSAGES // 2)]
    (root / "Inbox").write_bytes(_mbox(inbox))
    (root / "Inbox.sbd" / "Lists").write_bytes(_mbox(sub))
    seen: list[int] = []

    def progress(report: ImportReport) -> None:
        seen.append(report.messages)

    report = await import_path(archive, "alice", root, progress=progress)
    assert (report.new, report.kept, report.unreadable) == (len(inbox) + len(sub), 0, 0)
    assert seen == sorted(seen)
    assert seen[-1] == len(inbox) + len(sub)
    assert len(seen) >= 3
    folders = await _folders(archive, "alice")
    assert sorted(folders["Inbox"]) == sorted(map(_digest, inbox))
    assert sorted(folders["Inbox/Lists"]) == sorted(map(_digest, sub))


async def test_a_large_mbox_message_is_kept_byte_exact(archive: Archive, tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * (SPOOL_THRESHOLD // 16 + 1000) + b"\r\n"
    small = _message(7)
    source = tmp_path / "big.mbox"
    source.write_bytes(_mbox([small, big, small]))
    report = await import_path(archive, "alice", source, folder="Big")
    assert (report.new, report.kept) == (2, 1)
    entries = [entry async for entry in archive.entries("alice", MatchAll())]
    assert {entry.folder for entry in entries} == {"Big"}
    (kept,) = [entry for entry in entries if entry.digest == _digest(big)]
    assert b"".join([chunk async for chunk in archive.read("alice", kept.id)]) == big


async def test_a_path_that_is_no_mail_is_refused(archive: Archive, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"nothing here\n")
    with pytest.raises(ArchiveError, match="not an mbox"):
        await import_path(archive, "alice", notes)
    with pytest.raises(ArchiveError, match="cannot read"):
        await import_path(archive, "alice", tmp_path / "missing")
