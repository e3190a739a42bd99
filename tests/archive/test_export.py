"""Export from a real archive (SQLite) to mbox, Maildir and eml-zip: every message
comes out as it went in, read back by other readers than ours, and an export that
stops part-way finishes on the next run with nothing lost and nothing twice."""

from __future__ import annotations

import asyncio
import hashlib
import io
import mailbox
import re
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from popbox.archive.base import Archive, ArchiveSource, Entry, MatchAll
from popbox.archive.export import (
    CHECKPOINT_MESSAGES,
    ExportFormat,
    ExportResult,
    export_messages,
    mbox_stream,
    read_local_entries,
    state_path,
)
from popbox.archive.importer import import_path
from popbox.archive.query import parse_query
from popbox.archive.sqlite import SqliteArchive
from popbox.errors import ArchiveError

# Messages an mbox gets wrong when it is careless: From lines at every depth of
# quoting, CRLF and LF and both in one message, a Return-Path, a bare CR (no line end:
# what follows it is no line start).
TRICKY = [
    b"Return-Path: <alice@example.org>\r\nSubject: crlf\r\n\r\nFrom the start\r\n"
    b">From once\r\n>>From twice\r\n\r\n",
    b"Subject: lf only\n\nFrom here\n>From there\nFrom\nFro\n",
    b"Return-Path: <>\nSubject: mixed\r\n\nline\r\nFrom mixed\n\n\n",
    b"Subject: ends in a blank line\n\nbody\n\n",
    b"From: someone\nSubject: header From line\n\nx\n",
    b"Subject: bare CR\n\nline\rFrom after a bare CR\r>From too\n",
]


class _Stop(Exception):
    """Raised from the progress callback: an export interrupted part-way."""


@pytest.fixture
async def archive(tmp_path: Path) -> AsyncIterator[Archive]:
    kept = SqliteArchive(tmp_path / "archive")
    try:
        yield kept
    finally:
        await kept.close()


def _digests(messages: list[bytes]) -> list[str]:
    return sorted(hashlib.sha256(message).hexdigest() for message in messages)


async def _user_digests(archive: Archive, user: str) -> list[str]:
    return sorted([entry.digest async for entry in archive.entries(user, MatchAll())])


async def _keep(archive: Archive, user: str, messages: list[bytes]) -> None:
    added = await archive.add_batch(user, messages, source=ArchiveSource.DELIVERED)
    assert all(result.new for result in added)


def _many(count: int) -> list[bytes]:
    return [
        f"Subject: message {n}\r\nMessage-ID: <{n}@example.org>\r\n\r\n".encode()
        + b"From line\r\n" * (n % 3)
        + f"body {n}\r\n".encode() * (n % 50 + 1)
        for n in range(count)
    ]


async def test_mbox_export_then_import_gives_the_same_digests(
    archive: Archive, tmp_path: Path
) -> None:
    await _keep(archive, "alice", TRICKY)
    result = await export_messages(
        archive, "alice", MatchAll(), ExportFormat.MBOX, tmp_path / "out.mbox"
    )
    assert (result.messages, result.resumed) == (len(TRICKY), 0)
    assert result.octets == sum(len(message) for message in TRICKY)
    data = (tmp_path / "out.mbox").read_bytes()
    assert data.startswith(b"From alice@example.org ")
    assert b"\nFrom MAILER-DAEMON " in data
    assert b"\n>From the start\r\n>>From once\r\n>>>From twice\r\n" in data
    assert not state_path(tmp_path / "out.mbox").exists()

    report = await import_path(archive, "bob", tmp_path / "out.mbox")
    assert (report.new, report.kept, report.unreadable) == (len(TRICKY), 0, 0)
    assert await _user_digests(archive, "bob") == _digests(TRICKY)


async def test_maildir_export_is_byte_exact_and_a_maildir_reader_reads_it(
    archive: Archive, tmp_path: Path
) -> None:
    await _keep(archive, "alice", TRICKY)
    output = tmp_path / "Maildir"
    await export_messages(archive, "alice", MatchAll(), ExportFormat.MAILDIR, output)
    names = sorted(path.name for path in (output / "cur").iterdir())
    assert len(names) == len(TRICKY)
    assert all(re.fullmatch(r"\d+\.M\d+Q[0-9a-f]{16}\.[^/:]+:2,S", name) for name in names)
    files = [path.read_bytes() for path in (output / "cur").iterdir()]
    assert _digests(files) == _digests(TRICKY)
    box = mailbox.Maildir(output, create=False)
    assert sorted(box[key].get_flags() for key in box.iterkeys()) == ["S"] * len(TRICKY)


async def test_eml_zip_is_byte_exact_and_named_by_date_and_id(
    archive: Archive, tmp_path: Path
) -> None:
    await _keep(archive, "alice", TRICKY)
    output = tmp_path / "mail.zip"
    await export_messages(archive, "alice", MatchAll(), ExportFormat.EML_ZIP, output)
    with zipfile.ZipFile(output) as kept:
        assert kept.testzip() is None
        names = kept.namelist()
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d{6}_\d+\.eml", name) for name in names)
        assert _digests([kept.read(name) for name in names]) == _digests(TRICKY)


async def test_only_what_the_query_matches_is_exported(archive: Archive, tmp_path: Path) -> None:
    await _keep(archive, "alice", TRICKY)
    await _keep(archive, "bob", [b"Subject: bob's crlf\r\n\r\nnot alice's\r\n"])
    output = tmp_path / "crlf.zip"
    result = await export_messages(
        archive, "alice", parse_query("subject:crlf"), ExportFormat.EML_ZIP, output
    )
    assert result.messages == 1
    with zipfile.ZipFile(output) as kept:
        assert [kept.read(name) for name in kept.namelist()] == [TRICKY[0]]


@pytest.mark.parametrize("fmt", list(ExportFormat))
async def test_an_interrupted_export_finishes_without_loss_or_duplicates(
    archive: Archive, tmp_path: Path, fmt: ExportFormat
) -> None:
    messages = _many(CHECKPOINT_MESSAGES * 2 + 57)
    await _keep(archive, "alice", messages)
    whole = tmp_path / f"whole.{fmt.value}"
    await export_messages(archive, "alice", MatchAll(), fmt, whole)

    output = tmp_path / f"part.{fmt.value}"
    stop_at = CHECKPOINT_MESSAGES + 31

    def stop(written: int, entry: Entry) -> None:
        if written == stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        await export_messages(archive, "alice", MatchAll(), fmt, output, on_message=stop)
    assert state_path(output).exists()
    seen: list[int] = []
    result = await export_messages(
        archive, "alice", MatchAll(), fmt, output, on_message=lambda n, entry: seen.append(n)
    )
    assert result == ExportResult(
        output, len(messages), sum(map(len, messages)), CHECKPOINT_MESSAGES
    )
    assert seen[0] == CHECKPOINT_MESSAGES + 1
    assert not state_path(output).exists()
    assert _exported(output, fmt) == _exported(whole, fmt)
    if fmt is ExportFormat.MBOX:
        assert output.read_bytes() == whole.read_bytes()
    if fmt is ExportFormat.EML_ZIP:
        assert _zip_directory(output) == _zip_directory(whole)
    assert _digests(list(_exported(output, fmt).values())) == _digests(messages)


def _exported(output: Path, fmt: ExportFormat) -> dict[str, bytes]:
    if fmt is ExportFormat.MBOX:
        return _mbox_messages(output)
    if fmt is ExportFormat.MAILDIR:
        return {path.name: path.read_bytes() for path in (output / "cur").iterdir()}
    with zipfile.ZipFile(output) as kept:
        assert kept.testzip() is None
        names = kept.namelist()
        assert len(names) == len(set(names))
        return {name: kept.read(name) for name in names}


def _zip_directory(output: Path) -> list[tuple[object, ...]]:
    with zipfile.ZipFile(output) as kept:
        return [
            (info.filename, info.CRC, info.file_size, info.date_time, info.external_attr)
            for info in kept.infolist()
        ]


def _mbox_messages(output: Path) -> dict[str, bytes]:
    # The stdlib reader (mboxo: it leaves the quoting); our messages have none to undo
    # but "From line", which it must see quoted.
    box = mailbox.mbox(output, create=False)
    try:
        return {
            str(key): box.get_bytes(key).replace(b"\n>From line", b"\nFrom line")
            for key in box.iterkeys()
        }
    finally:
        box.close()


async def test_an_existing_output_is_never_overwritten(archive: Archive, tmp_path: Path) -> None:
    await _keep(archive, "alice", TRICKY)
    output = tmp_path / "out.mbox"
    output.write_bytes(b"precious\n")
    with pytest.raises(ArchiveError, match="exists"):
        await export_messages(archive, "alice", MatchAll(), ExportFormat.MBOX, output)
    assert output.read_bytes() == b"precious\n"
    directory = tmp_path / "Maildir"
    (directory / "cur").mkdir(parents=True)
    with pytest.raises(ArchiveError, match="exists"):
        await export_messages(archive, "alice", MatchAll(), ExportFormat.MAILDIR, directory)


async def test_another_exports_state_is_not_resumed(archive: Archive, tmp_path: Path) -> None:
    await _keep(archive, "alice", _many(CHECKPOINT_MESSAGES + 5))
    output = tmp_path / "out.mbox"

    def stop(written: int, entry: Entry) -> None:
        if written == CHECKPOINT_MESSAGES + 1:
            raise _Stop

    with pytest.raises(_Stop):
        await export_messages(
            archive, "alice", MatchAll(), ExportFormat.MBOX, output, on_message=stop
        )
    with pytest.raises(ArchiveError, match="another query"):
        await export_messages(archive, "alice", parse_query("body"), ExportFormat.MBOX, output)
    with pytest.raises(ArchiveError, match="another query"):
        await export_messages(archive, "alice", MatchAll(), ExportFormat.EML_ZIP, output)
    result = await export_messages(archive, "alice", MatchAll(), ExportFormat.MBOX, output)
    assert result.messages == CHECKPOINT_MESSAGES + 5


@pytest.mark.parametrize("fmt", list(ExportFormat))
async def test_a_second_run_of_a_running_export_is_refused_and_harms_nothing(
    archive: Archive, tmp_path: Path, fmt: ExportFormat
) -> None:
    messages = _many(CHECKPOINT_MESSAGES + 10)
    await _keep(archive, "alice", messages)
    output = tmp_path / f"out.{fmt.value}"
    refusals: list[str] = []

    async def second_run() -> None:
        try:
            await export_messages(archive, "alice", MatchAll(), fmt, output)
        except ArchiveError as exc:
            refusals.append(str(exc))

    tasks: list[asyncio.Task[None]] = []

    def start_another(written: int, entry: Entry) -> None:
        if written in (1, CHECKPOINT_MESSAGES + 1):
            tasks.append(asyncio.ensure_future(second_run()))

    await export_messages(archive, "alice", MatchAll(), fmt, output, on_message=start_another)
    await asyncio.gather(*tasks)
    assert len(refusals) == 2
    assert all("another export is writing" in text for text in refusals)
    assert _digests(list(_exported(output, fmt).values())) == _digests(messages)


# --- Listing a zip that was never closed, as a resume after SIGKILL does ----------

ZIP_ENTRIES = [
    ("2020-01-06_090000_1.eml", b"Subject: one\r\n\r\nbody\r\n", False),
    ("2020-01-06_090100_2.eml", b"Subject: two\n\n" + b"x" * 100_000, True),
    ("2020-01-06_090200_3.eml", b"", False),
]


def _unclosed_zip() -> tuple[bytes, list[int]]:
    """A zip's bytes as a killed writer leaves them (no directory), and where each
    entry ended."""
    buffer = io.BytesIO()
    writer = zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
    ends = []
    for name, data, zip64 in ZIP_ENTRIES:
        with writer.open(
            zipfile.ZipInfo(name, (2020, 1, 6, 9, 0, 0)), "w", force_zip64=zip64
        ) as out:
            out.write(data)
        ends.append(buffer.tell())
    snapshot = buffer.getvalue()[: ends[-1]]
    writer.close()
    return snapshot, ends


def test_entries_of_an_unclosed_zip_are_listed_and_a_directory_completes_it() -> None:
    data, ends = _unclosed_zip()
    fp = io.BytesIO(data)
    infos = read_local_entries(fp, ends[-1])
    assert [info.filename for info in infos] == [name for name, _, _ in ZIP_ENTRIES]
    assert [info.file_size for info in infos] == [len(data) for _, data, _ in ZIP_ENTRIES]
    fp.seek(ends[-1])
    resumed = zipfile.ZipFile(fp, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
    resumed.filelist.extend(infos)
    resumed.writestr("2020-01-06_090300_4.eml", b"Subject: four\n\n")
    resumed.close()
    with zipfile.ZipFile(io.BytesIO(fp.getvalue())) as complete:
        assert complete.testzip() is None
        assert [complete.read(name) for name, _, _ in ZIP_ENTRIES] == [d for _, d, _ in ZIP_ENTRIES]
        assert complete.read("2020-01-06_090300_4.eml") == b"Subject: four\n\n"


def test_a_length_inside_an_entry_is_refused() -> None:
    data, ends = _unclosed_zip()
    with pytest.raises(ArchiveError, match="runs past"):
        read_local_entries(io.BytesIO(data), ends[1] - 10)
    with pytest.raises(ArchiveError, match="no zip entry"):
        read_local_entries(io.BytesIO(b"\0" * 64), 64)


async def test_from_line_smuggling_cannot_split_an_exported_message(
    archive: Archive, tmp_path: Path
) -> None:
    smuggler = (
        b"Subject: hello\n\nhi\n\n"
        b"From attacker@evil.example Mon Jan  1 00:00:00 2024\n"
        b"Subject: Your bank: urgent\n\nclick here\n"
    )
    await _keep(archive, "alice", [smuggler])
    output = tmp_path / "out.mbox"
    await export_messages(archive, "alice", MatchAll(), ExportFormat.MBOX, output)
    box = mailbox.mbox(output, create=False)
    try:
        assert [box[key]["Subject"] for key in box.iterkeys()] == ["hello"]
    finally:
        box.close()
    report = await import_path(archive, "bob", output)
    assert report.new == 1
    assert await _user_digests(archive, "bob") == _digests([smuggler])


async def test_the_download_stream_is_the_exported_file(archive: Archive, tmp_path: Path) -> None:
    await _keep(archive, "alice", TRICKY)
    output = tmp_path / "out.mbox"
    await export_messages(archive, "alice", MatchAll(), ExportFormat.MBOX, output)
    streamed = b"".join([chunk async for chunk in mbox_stream(archive, "alice", MatchAll())])
    assert streamed == output.read_bytes()
