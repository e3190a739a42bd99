"""Maildir sink: each message becomes one file, moved into new/ only once it is durable.

Delivery follows the Maildir protocol (tmp/ -> fsync -> rename into new/ -> fsync the
directory), so a reader never sees half a message and a crash leaves at most a stray
file in tmp/. The idempotency key is part of the file name (``K`` and 24 hex digits of
its SHA-256), so a redelivery after a crash between the rename and the collector's
own record finds the file (in new/ or, once a mail reader moved it, in cur/) and skips.
Line ends are converted to LF, as Maildir readers expect.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Final

from popbox.collector.base import FetchedMessage
from popbox.collector.config import MaildirSinkSettings
from popbox.collector.sinks import SinkContext
from popbox.errors import TemporarySinkError

__all__ = ["MaildirSink", "create_sink", "key_tag"]

# Copy in 256 KiB pieces: big enough for throughput, small enough to stay bounded.
COPY_CHUNK: Final = 256 * 1024

_KEY_IN_NAME: Final = re.compile(r"K([0-9a-f]{24})")
_sequence = itertools.count()


def key_tag(idempotency_key: str) -> str:
    """The part of a file name that identifies a message's idempotency key."""
    return hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:24]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_as_lf(source: Path, target_fd: int) -> int:
    """Copy a CRLF message into ``target_fd`` with LF line ends; return octets written."""
    written = 0
    carry = b""
    with source.open("rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            data = carry + chunk
            # A CR at the end may be the first half of a CRLF split across reads.
            carry = b"\r" if data.endswith(b"\r") else b""
            if carry:
                data = data[:-1]
            out = data.replace(b"\r\n", b"\n")
            view = memoryview(out)
            while view:
                count = os.write(target_fd, view)
                view = view[count:]
                written += count
    if carry:
        written += os.write(target_fd, carry)
    return written


class MaildirSink:
    """Delivers into one Maildir, creating it when missing."""

    def __init__(self, settings: MaildirSinkSettings) -> None:
        self._settings = settings
        self._root = settings.path
        self._known: set[str] | None = None
        # Deliveries run in worker threads, several at once; the first builds the set.
        self._prepare_lock = threading.Lock()
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    @property
    def name(self) -> str:
        return self._settings.label

    def _prepare(self) -> set[str]:
        with self._prepare_lock:
            return self._prepare_locked()

    def _prepare_locked(self) -> set[str]:
        if self._known is None:
            for sub in ("tmp", "new", "cur"):
                (self._root / sub).mkdir(parents=True, exist_ok=True)
            # One listing per run, not per message: the set answers "already here?".
            known: set[str] = set()
            for sub in ("new", "cur"):
                for entry in os.scandir(self._root / sub):
                    match = _KEY_IN_NAME.search(entry.name)
                    if match:
                        known.add(match.group(1))
            self._known = known
        return self._known

    def _deliver_sync(self, message: FetchedMessage) -> None:
        known = self._prepare()
        tag = key_tag(message.idempotency_key)
        if tag in known:
            return
        now = time.time()
        unique = (
            f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_sequence)}K{tag}.{self._host}"
        )
        tmp_path = self._root / "tmp" / unique
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = copy_as_lf(message.path, fd)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp_path.unlink(missing_ok=True)
            raise
        os.close(fd)
        final = self._root / "new" / f"{unique},S={size}"
        os.rename(tmp_path, final)
        _fsync_dir(self._root / "new")
        known.add(tag)

    async def deliver(self, message: FetchedMessage) -> None:
        try:
            await asyncio.to_thread(self._deliver_sync, message)
        except OSError as exc:
            # A full disk or a permission problem may pass; quarantine is for the
            # message's own faults, and nothing about a message makes a Maildir fail.
            raise TemporarySinkError(f"{self.name}: {exc}") from exc

    async def close(self) -> None:
        self._known = None


def create_sink(settings: MaildirSinkSettings, context: SinkContext) -> MaildirSink:
    return MaildirSink(settings)
