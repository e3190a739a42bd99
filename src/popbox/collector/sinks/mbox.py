"""mbox sink: appends mboxrd entries under an fcntl lock and a ``.lock`` dotlock.

mboxrd (the variant qmail and mutt read) quotes every line matching ``>*From `` with
one more ``>``, so the quoting reverses exactly. Both locks are taken because mail
readers on the same file use either (mutt fcntl, procmail and older MUAs the dotlock).
Each entry opens with ``From SENDER DATE``: POP3 carries no envelope sender, so SENDER
is the message's Return-Path address, else its From address, else MAILER-DAEMON (what
mutt and formail write for such a message).

``deliver_batch`` appends a whole batch under one lock and with one fsync of the mbox;
``deliver`` is a batch of one.

Idempotency: before appending, the sink writes each entry's offset, key tag and From
line to a small sidecar file (``MBOX.popbox-recent``, the last entries only) and
fsyncs it; after the append and the fsync it adds each entry's length. A redelivery
after a crash finds the tag: with a length the entry is complete and is skipped;
without one, the file is compared with the entry as it would have been written: all
there (the append finished, the bookkeeping did not) it is made durable and skipped;
cut short at the end of the file, the partial tail is truncated away and the entry
written again; anything else (another writer appended after it) means it is written
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from popbox.collector.base import FetchedMessage
from popbox.collector.config import MboxSinkSettings
from popbox.collector.sinks import SinkContext
from popbox.collector.sinks.maildir import crlf_to_lf, key_tag
from popbox.errors import TemporarySinkError
from popbox.fileio import fsync_dir, write_all

__all__ = ["MboxSink", "create_sink", "envelope_sender", "mboxrd_lines"]

# Readline limit: lines longer than this are written in pieces; memory stays bounded.
LINE_PIECE: Final = 64 * 1024
# Messages up to this size are quoted in memory (two C-level passes over the bytes);
# larger ones stream line by line, so memory stays bounded whatever the size.
IN_MEMORY_MAX: Final = 4 * 1024 * 1024
# Entries kept in the sidecar: two batches of the poll engine in flight (256
# messages each) and room for other collectors' entries.
RECENT_ENTRIES: Final = 1024
# A dotlock older than this was left by a crashed writer (procmail uses 17 minutes;
# our appends take seconds).
STALE_DOTLOCK_SECONDS: Final = 300.0
# How long to wait for another writer's dotlock.
DOTLOCK_WAIT_SECONDS: Final = 30.0
# How much of a message's start is searched for Return-Path and From: headers beyond
# this are not headers a mail client would show either.
HEADER_SCAN: Final = 256 * 1024
# Who a message without a known sender is from, as in sendmail's mboxes.
UNKNOWN_SENDER: Final = "MAILER-DAEMON"

_FROM_LINE: Final = re.compile(rb"^>*From ")
_GT: Final = ord(">")
_LF: Final = ord("\n")
_HEADER_END: Final = re.compile(rb"\r?\n\r?\n")
_RETURN_PATH: Final = re.compile(rb"(?im)^Return-Path:[ \t]*<([^<>\r\n]*)>")
# A From header with its folded continuation lines.
_FROM_HEADER: Final = re.compile(rb"(?im)^From:((?:[^\r\n]*)(?:\r?\n[ \t][^\r\n]*)*)")

# One writer at a time per mbox within this process: fcntl locks belong to the
# process, so they do not keep two of its threads (two batches) apart.
_PATH_LOCKS: dict[Path, threading.Lock] = {}
_PATH_LOCKS_GUARD: Final = threading.Lock()


def _path_lock(path: Path) -> threading.Lock:
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(path, threading.Lock())


def mboxrd_pieces(handle: BinaryIO) -> Iterator[bytes]:
    """A CRLF message from ``handle`` as mboxrd body pieces with LF line ends: the
    same octets as ``mboxrd_bytes``, with memory bounded by the piece size."""
    at_line_start = True
    carry = b""
    while piece := handle.readline(LINE_PIECE):
        piece = carry + piece
        complete = piece.endswith(b"\n")
        if complete:
            piece = piece[:-2] + b"\n" if piece.endswith(b"\r\n") else piece
        # A CR ending a piece of a long line may be the first half of a CRLF.
        carry = b"\r" if not complete and piece.endswith(b"\r") else b""
        if carry:
            piece = piece[:-1]
        if at_line_start and _FROM_LINE.match(piece):
            piece = b">" + piece
        at_line_start = complete
        yield piece
    if carry:
        yield carry
    if not at_line_start:
        yield b"\n"


def mboxrd_lines(path: Path) -> Iterator[bytes]:
    """The message at ``path`` (CRLF) as mboxrd body pieces with LF line ends."""
    with path.open("rb") as handle:
        yield from mboxrd_pieces(handle)


def mboxrd_bytes(data: bytes) -> bytes:
    """The CRLF message ``data`` in mboxrd form with LF line ends, computed over the
    whole buffer (C-level passes; what ``mboxrd_pieces`` yields, joined)."""
    lf = crlf_to_lf(data)
    # Only lines that hold "From " can need a quote: find those, not every line start.
    cuts: list[int] = []
    at = lf.find(b"From ")
    while at != -1:
        start = at
        while start > 0 and lf[start - 1] == _GT:
            start -= 1
        if start == 0 or lf[start - 1] == _LF:
            cuts.append(start)
        at = lf.find(b"From ", at + 1)
    if cuts:
        lf = b">".join(lf[a:b] for a, b in zip([0, *cuts], [*cuts, len(lf)], strict=True))
    return lf if not lf or lf.endswith(b"\n") else lf + b"\n"


def envelope_sender(head: bytes) -> str:
    """The sender for the ``From `` line of a message starting with ``head``: the
    Return-Path address, else the From header's address, else MAILER-DAEMON."""
    end = _HEADER_END.search(head)
    limit = end.start() if end else len(head)
    candidates: list[str] = []
    if (path := _RETURN_PATH.search(head, 0, limit)) is not None:
        candidates.append(path.group(1).decode("ascii", "replace").strip())
    if (author := _FROM_HEADER.search(head, 0, limit)) is not None:
        value = re.sub(rb"\r?\n[ \t]", b" ", author.group(1)).decode("utf-8", "replace")
        address = email.utils.parseaddr(value)[1].strip()
        # A name without an address ("undisclosed recipients") is no sender.
        candidates.append(address if "@" in address else "")
    for sender in candidates:
        if sender and sender.isascii() and not any(ch.isspace() for ch in sender):
            return sender
    return UNKNOWN_SENDER


def _owner_is_dead(content: str) -> bool:
    """A dotlock holding the pid of a process that no longer exists (we were killed
    holding it, or another local writer was) is stale; we hold the fcntl lock, so no
    live writer of ours is inside."""
    text = content.strip()
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


@dataclass(slots=True)
class _Entry:
    """One message as this sink writes it into the mbox."""

    message: FetchedMessage
    from_line: bytes
    body: bytes | None
    """The quoted body in memory, or None: streamed from the message's file."""

    @classmethod
    def build(cls, message: FetchedMessage, from_line: bytes) -> _Entry:
        if message.data is None and message.size > IN_MEMORY_MAX:
            return cls(message, from_line, None)
        return cls(message, from_line, mboxrd_bytes(message.read_bytes()))

    def pieces(self) -> Iterator[bytes]:
        yield self.from_line
        if self.body is not None:
            yield self.body
        else:
            yield from mboxrd_lines(self.message.path)
        yield b"\n"

    def length(self) -> int:
        return sum(map(len, self.pieces()))


def _head(message: FetchedMessage) -> bytes:
    if message.data is not None:
        return message.data[:HEADER_SCAN]
    with message.path.open("rb") as handle:
        return handle.read(HEADER_SCAN)


def _from_line(message: FetchedMessage) -> bytes:
    stamp = time.asctime(time.gmtime())
    return f"From {envelope_sender(_head(message))} {stamp}\n".encode("ascii")


def _compare(fd: int, offset: int, entry: _Entry) -> str:
    """How the file from ``offset`` relates to ``entry``: "complete" (all of it is
    there), "prefix" (a cut-short append of ours, at the end of the file) or "other"."""
    position = offset
    for piece in entry.pieces():
        found = os.pread(fd, len(piece), position)
        if found != piece:
            at_end = not os.pread(fd, 1, position + len(found))
            return "prefix" if piece.startswith(found) and at_end else "other"
        position += len(piece)
    return "complete"


class MboxSink:
    def __init__(self, settings: MboxSinkSettings) -> None:
        self._settings = settings
        self._path = settings.path
        self._sidecar = self._path.with_name(self._path.name + ".popbox-recent")
        self._dotlock = self._path.with_name(self._path.name + ".lock")

    @property
    def name(self) -> str:
        return self._settings.label

    @contextlib.contextmanager
    def _locked(self, fd: int) -> Iterator[None]:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        deadline = time.monotonic() + DOTLOCK_WAIT_SECONDS
        # The dotlock appears with our pid already in it (write a private file, then
        # link it into place), so a lock left by a crash can always be told stale.
        private = self._dotlock.with_name(f"{self._dotlock.name}.{os.getpid()}")
        private.write_text(f"{os.getpid()}\n", encoding="ascii")
        while True:
            try:
                os.link(private, self._dotlock)
                private.unlink()
                break
            except FileExistsError:
                try:
                    age = time.time() - self._dotlock.stat().st_mtime
                    owner = self._dotlock.read_text(encoding="ascii", errors="replace")
                except FileNotFoundError:
                    continue
                if age > STALE_DOTLOCK_SECONDS or _owner_is_dead(owner):
                    self._dotlock.unlink(missing_ok=True)
                    continue
                if time.monotonic() > deadline:
                    private.unlink(missing_ok=True)
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                    raise TemporarySinkError(f"{self.name}: {self._dotlock} is held") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            self._dotlock.unlink(missing_ok=True)
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def _read_recent(self) -> list[dict[str, Any]]:
        try:
            entries = json.loads(self._sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [entry for entry in entries if isinstance(entry, dict)]

    def _write_recent(self, entries: list[dict[str, Any]], keep: int) -> None:
        tmp = self._sidecar.with_name(self._sidecar.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(entries[-keep:], handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._sidecar)
        fsync_dir(self._path.parent)

    def _recognise(
        self, fd: int, recent: list[dict[str, Any]], message: FetchedMessage, tag: str
    ) -> bool:
        """Whether the mbox holds ``message`` whole already (a redelivery); a cut-short
        append of it at the end of the file is truncated away (returns False)."""
        record = next((e for e in recent if e.get("tag") == tag), None)
        if record is None:
            return False
        size = os.fstat(fd).st_size
        offset = int(record["offset"])
        length = record.get("length")
        if length is not None and size >= offset + int(length):
            return True
        if length is None and size >= offset:
            entry = _Entry.build(message, str(record.get("from", "")).encode())
            state = _compare(fd, offset, entry)
            if state == "complete":
                record["length"] = entry.length()
                return True
            if state == "prefix":
                # Our own append was cut short by a crash and nobody wrote after it:
                # remove the partial entry before writing it again.
                os.ftruncate(fd, offset)
        recent.remove(record)
        return False

    def _deliver_sync(self, messages: Sequence[FetchedMessage]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with _path_lock(self._path), self._locked(fd):
                self._append(fd, messages)
        finally:
            os.close(fd)

    def _append(self, fd: int, messages: Sequence[FetchedMessage]) -> None:
        recent = self._read_recent()
        fresh: list[tuple[FetchedMessage, str]] = []
        recognised = False
        seen: set[str] = set()
        for message in messages:
            tag = key_tag(message.idempotency_key)
            if tag in seen:
                continue
            seen.add(tag)
            if self._recognise(fd, recent, message, tag):
                recognised = True
            else:
                fresh.append((message, tag))
        keep = RECENT_ENTRIES + len(fresh)
        if recognised:
            # A recognised entry may be in the page cache only (the run that wrote it
            # was killed before its fsync): durable before it is reported as taken.
            os.fsync(fd)
            if not fresh:
                self._write_recent(recent, keep)
        if not fresh:
            return
        offset = os.fstat(fd).st_size
        planned: list[tuple[_Entry, dict[str, Any]]] = []
        for message, tag in fresh:
            entry = _Entry.build(message, _from_line(message))
            from_text = entry.from_line.decode("ascii")
            record = {"tag": tag, "offset": offset, "length": None, "from": from_text}
            recent.append(record)
            planned.append((entry, record))
            offset += entry.length()
        self._write_recent(recent, keep)
        for entry, record in planned:
            record["length"] = sum(write_all(fd, piece) for piece in entry.pieces())
        os.fsync(fd)
        self._write_recent(recent, keep)

    async def deliver(self, message: FetchedMessage) -> None:
        await self.deliver_batch([message])

    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> None:
        try:
            await asyncio.to_thread(self._deliver_sync, messages)
        except OSError as exc:
            raise TemporarySinkError(f"{self.name}: {exc}") from exc

    async def close(self) -> None:
        return None


def create_sink(settings: MboxSinkSettings, context: SinkContext) -> MboxSink:
    return MboxSink(settings)
