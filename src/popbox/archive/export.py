"""Taking a user's archived mail out (``popbox archive export``): an mbox, a Maildir or
a zip of .eml files, streamed and resumable.

Streamed: a message goes from ``Archive.read``'s chunks to the output as it comes, so
memory stays bounded whatever the size of a message or of the export.

Resumable: ``Archive.entries`` walks in id order, and a small state file beside the
output (``<output>.popbox-export``) records, at each checkpoint, the last id written,
how long the output was then, and what is being exported (format, user, query). The
output is made durable before the state says so. A killed export run again with the
same arguments cuts the output back to that length and goes on after that id: no
message lost, none twice. When the export ends, the state file goes; an output with
no state file is never written into (``ArchiveError``), nor is an output whose state
file is another export's.

- **mbox** (mboxrd, popbox.archive.mboxrd): each message after a ``From `` line with
  the Return-Path address (else the From address, else MAILER-DAEMON) and the time
  it came into the archive; resuming cuts the file back.
- **maildir**: ``cur/`` files named ``<received>.M<id>Q<digest>.<host>:2,S`` (seen),
  written to ``tmp/`` and renamed; the name depends only on the entry, so a message
  written again after a resume replaces itself. The files are fsynced at each
  checkpoint, together.
- **eml-zip**: one ``<date>_<id>.eml`` per message (the Date header's moment, else
  when it came, UTC), deflated, ZIP64 when large. A zip's directory is written at its
  end, which a killed export never reached; resuming reads the local headers of the
  entries up to the recorded length (``read_local_entries``: zipfile writes each one
  with its final sizes and CRC once the entry is complete), cuts the rest, and
  writes the directory for them and the new entries when it ends.

Messages come out exactly as stored: maildir and eml-zip byte for byte, mbox up to
its framing (a message with no line end on its last line gains one, see mboxrd).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import re
import socket
import struct
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from popbox.archive.base import Archive, Entry, Query
from popbox.archive.mboxrd import HEADER_SCAN, MboxrdQuoter, envelope_sender, from_line
from popbox.errors import ArchiveError, NoSuchEntry
from popbox.fileio import fsync_dir, replace_file

__all__ = [
    "CHECKPOINT_MESSAGES",
    "CHECKPOINT_OCTETS",
    "STATE_SUFFIX",
    "ExportFormat",
    "ExportResult",
    "export_messages",
    "mbox_message",
    "mbox_stream",
    "read_local_entries",
    "state_path",
]

# A checkpoint (fsync, then the state file) at least this often: a killed export
# redoes at most this much, and the fsyncs stay few.
CHECKPOINT_MESSAGES: Final = 200
CHECKPOINT_OCTETS: Final = 32 * 1024 * 1024
# The state file's name beside the output.
STATE_SUFFIX: Final = ".popbox-export"
# Buffered writes to the mbox and the zip: few system calls for small messages.
WRITE_BUFFER: Final = 1024 * 1024
# Zip dates start in 1980 (the DOS date); an older or missing date is written so.
_ZIP_EPOCH: Final = 315532800.0
_STATE_VERSION: Final = 1
# An .eml in the zip unpacks readable by all, as a saved attachment would.
_EML_ATTRIBUTES: Final = 0o644 << 16


class ExportFormat(enum.Enum):
    MBOX = "mbox"
    MAILDIR = "maildir"
    EML_ZIP = "eml-zip"


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What an export wrote in all, this run and the runs it resumed."""

    output: Path
    messages: int
    octets: int
    """Octets of the messages as stored (not of the output)."""
    resumed: int
    """Messages an earlier, interrupted run had written."""
    vanished: int = 0
    """Messages removed from the archive while this run went through them."""


@dataclass(frozen=True, slots=True)
class _State:
    version: int
    format: str
    user: str
    query: str
    last_id: int
    length: int
    messages: int
    octets: int


def state_path(output: Path) -> Path:
    """Where the state of an export to ``output`` is kept while it runs."""
    return output.with_name(output.name + STATE_SUFFIX)


class _Writer(Protocol):
    async def write(self, entry: Entry, chunks: AsyncIterator[bytes]) -> None: ...

    def checkpoint(self) -> int:
        """Make what was written durable; the output's length (or 0)."""
        ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


async def export_messages(
    archive: Archive,
    user: str,
    query: Query,
    fmt: ExportFormat,
    output: Path,
    *,
    on_message: Callable[[int, Entry], None] | None = None,
) -> ExportResult:
    """Write the user's entries matching ``query`` to ``output``, or go on with an
    interrupted export of the same (see the module's docstring).

    ``on_message(written, entry)`` after each message, ``written`` counting those of
    earlier runs too. ArchiveError for an output that may not be written, and as the
    archive raises it; OSError as the output's file system does.
    """
    where = state_path(output)
    key = (fmt.value, user, repr(query))
    state = _load_state(where)
    if state is not None and (state.format, state.user, state.query) != key:
        raise ArchiveError(
            f"{output} is an unfinished export of {state.user} ({state.format}) with "
            f"another query; run that export again to finish it, or remove {output} "
            f"and {where}"
        )
    if state is None:
        if _occupied(output):
            raise ArchiveError(f"{output} exists; choose another output")
        state = _State(_STATE_VERSION, *key, last_id=0, length=0, messages=0, octets=0)
        _save_state(where, state)
    writer = _open_writer(fmt, output, state)
    resumed = messages = state.messages
    octets = state.octets
    last_id = state.last_id
    since_messages = since_octets = vanished = 0
    try:
        async for entry in archive.entries(user, query, after_id=state.last_id):
            chunks = await _opened(archive.read(user, entry.id))
            if chunks is None:
                vanished += 1
                continue
            await writer.write(entry, chunks)
            messages += 1
            octets += entry.size
            last_id = entry.id
            since_messages += 1
            since_octets += entry.size
            if since_messages >= CHECKPOINT_MESSAGES or since_octets >= CHECKPOINT_OCTETS:
                length = writer.checkpoint()
                state = _State(_STATE_VERSION, *key, last_id, length, messages, octets)
                _save_state(where, state)
                since_messages = since_octets = 0
            if on_message is not None:
                on_message(messages, entry)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    where.unlink(missing_ok=True)
    fsync_dir(where.parent)
    return ExportResult(output, messages, octets, resumed, vanished)


async def _opened(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes] | None:
    """The message's chunks once the first has come; None if it was removed (by
    retention, by hand) since the walk listed it: nothing of it is written then."""
    stream = aiter(chunks)
    try:
        first = await anext(stream)
    except NoSuchEntry:
        return None
    except StopAsyncIteration:
        first = b""

    async def joined() -> AsyncIterator[bytes]:
        yield first
        async for chunk in stream:
            yield chunk

    return joined()


def _occupied(output: Path) -> bool:
    if output.is_dir():
        return any(output.iterdir())
    return output.exists() or output.is_symlink()


def _load_state(where: Path) -> _State | None:
    try:
        text = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArchiveError(f"cannot read {where}: {exc.strerror or exc}") from exc
    try:
        state = _State(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise ArchiveError(f"{where} is not an export's state; remove it") from exc
    if state.version != _STATE_VERSION:
        raise ArchiveError(f"{where} is the state of another popbox version; remove it")
    return state


def _save_state(where: Path, state: _State) -> None:
    data = json.dumps(asdict(state)).encode("utf-8")
    replace_file(where.parent, where.name, where.name + ".tmp", [data])


def _open_writer(fmt: ExportFormat, output: Path, state: _State) -> _Writer:
    if fmt is ExportFormat.MAILDIR:
        return _MaildirWriter(output)
    fp = _open_output(output, state)
    if fmt is ExportFormat.MBOX:
        return _MboxWriter(fp)
    return _ZipWriter(fp, state)


def _open_output(output: Path, state: _State) -> BinaryIO:
    """The mbox or zip file, new, or cut back to the state's checkpoint."""
    if state.messages == 0 and not output.exists():
        fp = open(output, "xb", buffering=WRITE_BUFFER)  # noqa: SIM115
        _lock(fp.fileno(), output, fp.close)
        return fp
    fp = open(output, "r+b", buffering=WRITE_BUFFER)  # noqa: SIM115
    _lock(fp.fileno(), output, fp.close)
    size = fp.seek(0, os.SEEK_END)
    if size < state.length:
        fp.close()
        raise ArchiveError(
            f"{output} is shorter than its export state says ({size} < {state.length} "
            f"octets); remove it and {state_path(output)} and export again"
        )
    fp.truncate(state.length)
    fp.seek(state.length)
    return fp


def _lock(fd: int, output: Path, close: Callable[[], None]) -> None:
    """Hold ``output`` for this export alone: two runs of one export at once (cron
    and a hand) would write over each other. The lock goes with the descriptor."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        close()
        raise ArchiveError(f"another export is writing {output} now") from exc


def _durable_length(fp: BinaryIO) -> int:
    fp.flush()
    os.fsync(fp.fileno())
    return fp.tell()


# An address inside a From header's decoded text: "Name <a@b>" or a bare a@b.
_ADDRESS: Final = re.compile(r"[^\s<>\"]+@[^\s<>\"]+")


def author_address(sender: str) -> str:
    """The address in a decoded From header ("" if none), for the From line of a
    message that carries no Return-Path: what mutt and formail write there."""
    found = _ADDRESS.search(sender)
    return found.group(0) if found else ""


async def mbox_message(entry: Entry, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """One message as an mbox holds it: the From line, the message quoted (mboxrd),
    the empty line after it; from the message's chunks as ``Archive.read`` gives them."""
    # The From line needs the Return-Path header: hold the start until the header
    # block is complete (or HEADER_SCAN octets, whichever comes first).
    held: list[bytes] = []
    head = b""
    stream = aiter(chunks)
    async for chunk in stream:
        held.append(chunk)
        head += chunk[: HEADER_SCAN - len(head)]
        if len(head) >= HEADER_SCAN or b"\n\n" in head or b"\r\n\r\n" in head:
            break
    yield from_line(envelope_sender(head) or author_address(entry.sender), entry.received)
    quoter = MboxrdQuoter()
    last = b"\n"
    for chunk in held:
        yield quoter.feed(chunk)
        last = chunk[-1:] or last
    async for chunk in stream:
        yield quoter.feed(chunk)
        last = chunk[-1:] or last
    yield quoter.flush()
    yield b"\n" if last == b"\n" else b"\n\n"


async def mbox_stream(archive: Archive, user: str, query: Query) -> AsyncIterator[bytes]:
    """The user's entries matching ``query`` as one mbox, in chunks, in id order: what
    a download sends (no file, no state; an interrupted download starts again)."""
    async for entry in archive.entries(user, query):
        chunks = await _opened(archive.read(user, entry.id))
        if chunks is not None:
            async for part in mbox_message(entry, chunks):
                if part:
                    yield part


class _MboxWriter:
    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp

    async def write(self, entry: Entry, chunks: AsyncIterator[bytes]) -> None:
        async for part in mbox_message(entry, chunks):
            self._fp.write(part)

    def checkpoint(self) -> int:
        return _durable_length(self._fp)

    def finish(self) -> None:
        _durable_length(self._fp)
        self._fp.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fp.close()


def _maildir_host() -> str:
    # The Maildir specification's escapes for the two characters a name cannot hold.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


class _MaildirWriter:
    def __init__(self, output: Path) -> None:
        self._output = output
        self._host = _maildir_host()
        self._unsynced: list[Path] = []
        for part in ("tmp", "new", "cur"):
            (output / part).mkdir(parents=True, exist_ok=True)
        self._held = os.open(output, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _lock(self._held, output, lambda: os.close(self._held))
        # What a killed run left half-written in tmp/ is written again after the
        # checkpoint; only our own names are removed.
        for leftover in (output / "tmp").glob("*.M*Q*"):
            leftover.unlink(missing_ok=True)

    async def write(self, entry: Entry, chunks: AsyncIterator[bytes]) -> None:
        name = f"{int(entry.received)}.M{entry.id}Q{entry.digest[:16]}.{self._host}"
        tmp = self._output / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        moment = entry.sort_time
        os.utime(tmp, (moment, moment))
        target = self._output / "cur" / f"{name}:2,S"
        os.replace(tmp, target)
        self._unsynced.append(target)

    def checkpoint(self) -> int:
        # One fsync per file, all at the checkpoint: the journal commits once for most.
        for path in self._unsynced:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced.clear()
        fsync_dir(self._output / "cur")
        return 0

    def finish(self) -> None:
        try:
            self.checkpoint()
        finally:
            os.close(self._held)

    def abort(self) -> None:
        self._unsynced.clear()
        os.close(self._held)


def _zip_name(entry: Entry) -> str:
    stamp = time.strftime("%Y-%m-%d_%H%M%S", time.gmtime(max(0.0, entry.sort_time)))
    return f"{stamp}_{entry.id}.eml"


class _ZipWriter:
    def __init__(self, fp: BinaryIO, state: _State) -> None:
        self._fp = fp
        kept = read_local_entries(fp, state.length) if state.length else []
        if len(kept) != state.messages:
            fp.close()
            raise ArchiveError(
                f"the zip holds {len(kept)} messages where its export state says "
                f"{state.messages}; remove it and its state and export again"
            )
        fp.seek(state.length)
        self._zip = zipfile.ZipFile(fp, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
        # The entries of the earlier runs, so the directory written at the end has them.
        for info in kept:
            self._zip.filelist.append(info)
            self._zip.NameToInfo[info.filename] = info

    async def write(self, entry: Entry, chunks: AsyncIterator[bytes]) -> None:
        moment = time.gmtime(max(_ZIP_EPOCH, entry.sort_time))
        info = zipfile.ZipInfo(_zip_name(entry), moment[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = _EML_ATTRIBUTES
        # The size known in advance decides ZIP64 for this entry's local header.
        info.file_size = entry.size
        with self._zip.open(info, "w") as out:
            async for chunk in chunks:
                out.write(chunk)

    def checkpoint(self) -> int:
        return _durable_length(self._fp)

    def finish(self) -> None:
        self._zip.close()
        _durable_length(self._fp)
        self._fp.close()

    def abort(self) -> None:
        # Closing writes a directory after the entries; a resume cuts it off again.
        with contextlib.suppress(Exception):
            self._zip.close()
        with contextlib.suppress(OSError):
            self._fp.close()


# --- Resuming a zip: its entries, read from their local headers -----------------
#
# A zip's directory comes last; a writer killed before it leaves entries nobody can
# list. zipfile, writing to a seekable file, goes back after each entry and puts its
# final CRC and sizes into the entry's local header, so the complete entries up to a
# known length can be listed from those headers alone.

# APPNOTE.TXT 4.3.7: the local file header, and 4.5.3: the ZIP64 extra field.
_LOCAL_HEADER: Final = struct.Struct("<4sHHHHHLLLHH")
_LOCAL_SIGNATURE: Final = b"PK\x03\x04"
_ZIP64_EXTRA_ID: Final = 0x0001
_UTF8_NAME_FLAG: Final = 0x0800
_DATA_DESCRIPTOR_FLAG: Final = 0x0008
_MAX_32: Final = 0xFFFFFFFF


def read_local_entries(fp: BinaryIO, end: int) -> list[zipfile.ZipInfo]:
    """The entries stored in ``fp`` from its start up to exactly ``end``.

    ArchiveError if what is there is not one complete entry after another.
    """
    infos: list[zipfile.ZipInfo] = []
    position = 0
    while position < end:
        fp.seek(position)
        raw = fp.read(_LOCAL_HEADER.size)
        if len(raw) < _LOCAL_HEADER.size:
            raise ArchiveError(f"the zip ends inside an entry's header at {position}")
        (signature, version, flags, method, dos_time, dos_date, crc, compressed, size,
         name_length, extra_length) = _LOCAL_HEADER.unpack(raw)  # fmt: skip
        if signature != _LOCAL_SIGNATURE:
            raise ArchiveError(f"no zip entry where one should start, at {position}")
        if flags & _DATA_DESCRIPTOR_FLAG:
            raise ArchiveError(f"the zip entry at {position} has no sizes in its header")
        name = fp.read(name_length)
        extra = fp.read(extra_length)
        if len(name) != name_length or len(extra) != extra_length:
            raise ArchiveError(f"the zip ends inside an entry's header at {position}")
        if compressed == _MAX_32 or size == _MAX_32:
            size, compressed = _zip64_sizes(extra, size, compressed, position)
        info = zipfile.ZipInfo(
            name.decode("utf-8" if flags & _UTF8_NAME_FLAG else "cp437"),
            _dos_moment(dos_date, dos_time),
        )
        info.flag_bits = flags
        info.compress_type = method
        info.CRC = crc
        info.compress_size = compressed
        info.file_size = size
        info.header_offset = position
        info.extra = extra
        info.extract_version = max(info.extract_version, version)
        info.external_attr = _EML_ATTRIBUTES
        infos.append(info)
        position += _LOCAL_HEADER.size + name_length + extra_length + compressed
    if position != end:
        raise ArchiveError(f"the zip's last entry runs past {end} octets")
    return infos


def _zip64_sizes(extra: bytes, size: int, compressed: int, position: int) -> tuple[int, int]:
    offset = 0
    while offset + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, offset)
        body = extra[offset + 4 : offset + 4 + length]
        if field_id == _ZIP64_EXTRA_ID:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if size == _MAX_32 and values:
                size = values.pop(0)
            if compressed == _MAX_32 and values:
                compressed = values.pop(0)
            return size, compressed
        offset += 4 + length
    raise ArchiveError(f"the zip entry at {position} lacks its ZIP64 sizes")


def _dos_moment(dos_date: int, dos_time: int) -> tuple[int, int, int, int, int, int]:
    return (
        (dos_date >> 9) + 1980,
        (dos_date >> 5) & 0x0F,
        dos_date & 0x1F,
        dos_time >> 11,
        (dos_time >> 5) & 0x3F,
        (dos_time & 0x1F) * 2,
    )
