"""mbox sink: appends mboxrd entries under an fcntl lock and a ``.lock`` dotlock.

mboxrd (the variant qmail and mutt read) quotes every line matching ``>*From `` with
one more ``>``, so the quoting reverses exactly. Both locks are taken because mail
readers on the same file use either (mutt fcntl, procmail and older MUAs the dotlock).

Idempotency: before appending, the sink writes the entry's offset and key tag to a
small sidecar file (``MBOX.popbox-recent``, the last entries only) and fsyncs it;
after the append and fsync it adds the length. A redelivery after a crash finds the
tag: with a length the entry is complete and is skipped; without one the append was
cut short, the partial tail is truncated away and the entry written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from popbox.collector.base import FetchedMessage
from popbox.collector.config import MboxSinkSettings
from popbox.collector.sinks import SinkContext
from popbox.collector.sinks.maildir import key_tag
from popbox.errors import TemporarySinkError
from popbox.fileio import write_all

__all__ = ["MboxSink", "create_sink", "mboxrd_lines"]

# Readline limit: lines longer than this are written in pieces; memory stays bounded.
LINE_PIECE: Final = 64 * 1024
# Entries kept in the sidecar: more than concurrent writers could leave unconfirmed.
RECENT_ENTRIES: Final = 64
# A dotlock older than this was left by a crashed writer (procmail uses 17 minutes;
# our appends take seconds).
STALE_DOTLOCK_SECONDS: Final = 300.0
# How long to wait for another writer's dotlock.
DOTLOCK_WAIT_SECONDS: Final = 30.0

_FROM_LINE: Final = re.compile(rb"^>*From ")


def mboxrd_lines(path: Path) -> Iterator[bytes]:
    """The message at ``path`` (CRLF) as mboxrd body pieces with LF line ends."""
    at_line_start = True
    with path.open("rb") as handle:
        while piece := handle.readline(LINE_PIECE):
            complete = piece.endswith(b"\n")
            if complete:
                piece = piece[:-2] + b"\n" if piece.endswith(b"\r\n") else piece
            if at_line_start and _FROM_LINE.match(piece):
                piece = b">" + piece
            at_line_start = complete
            yield piece
    if not at_line_start:
        yield b"\n"


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

    def _write_recent(self, entries: list[dict[str, Any]]) -> None:
        tmp = self._sidecar.with_name(self._sidecar.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(entries[-RECENT_ENTRIES:], handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._sidecar)
        fd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _entry_pieces(self, from_line: bytes, message: FetchedMessage) -> Iterator[bytes]:
        yield from_line
        yield from mboxrd_lines(message.path)
        yield b"\n"

    def _compare_tail(self, fd: int, offset: int, expected: Iterator[bytes]) -> str:
        """How the file from ``offset`` relates to the entry we would write:
        "complete", "prefix" (a cut-short append of ours) or "other"."""
        position = offset
        for piece in expected:
            found = os.pread(fd, len(piece), position)
            if found != piece:
                return (
                    "prefix"
                    if piece.startswith(found) and not os.pread(fd, 1, position + len(found))
                    else "other"
                )
            position += len(piece)
        return "complete" if not os.pread(fd, 1, position) else "other"

    def _deliver_sync(self, message: FetchedMessage) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tag = key_tag(message.idempotency_key)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with self._locked(fd):
                size = os.fstat(fd).st_size
                recent = self._read_recent()
                entry = next((e for e in recent if e.get("tag") == tag), None)
                if entry is not None:
                    offset = int(entry["offset"])
                    length = entry.get("length")
                    if length is not None and size >= offset + int(length):
                        return
                    if length is None and size >= offset:
                        old_from = str(entry.get("from", "")).encode()
                        state = self._compare_tail(
                            fd, offset, self._entry_pieces(old_from, message)
                        )
                        if state == "complete":
                            entry["length"] = size - offset
                            self._write_recent(recent)
                            return
                        if state == "prefix":
                            # Our own append was cut short by a crash and nobody wrote
                            # after it: remove the partial entry before writing it again.
                            os.ftruncate(fd, offset)
                            size = offset
                    recent.remove(entry)
                stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
                from_line = f"From MAILER-DAEMON {stamp}\n"
                entry = {"tag": tag, "offset": size, "length": None, "from": from_line}
                recent.append(entry)
                self._write_recent(recent)
                written = 0
                for piece in self._entry_pieces(from_line.encode(), message):
                    written += write_all(fd, piece)
                os.fsync(fd)
                entry["length"] = written
                self._write_recent(recent)
        finally:
            os.close(fd)

    async def deliver(self, message: FetchedMessage) -> None:
        try:
            await asyncio.to_thread(self._deliver_sync, message)
        except OSError as exc:
            raise TemporarySinkError(f"{self.name}: {exc}") from exc

    async def close(self) -> None:
        return None


def create_sink(settings: MboxSinkSettings, context: SinkContext) -> MboxSink:
    return MboxSink(settings)
