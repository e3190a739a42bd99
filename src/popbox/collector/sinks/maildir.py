"""Maildir sink: each message becomes one file, moved into new/ only once it is durable.

Delivery follows the Maildir protocol (tmp/ -> fsync -> rename into new/ -> fsync the
directory), so a reader never sees half a message and a crash leaves at most a stray
file in tmp/. The idempotency key is part of the file name (``K`` and 24 hex digits of
its SHA-256), so a redelivery after a crash between the rename and the collector's
own record finds the file (in new/ or, once a mail reader moved it, in cur/) and skips.
Line ends are converted to LF, as Maildir readers expect.

``deliver_batch`` makes many messages durable for about the price of one: the files are
written and fsynced by a few threads at once (the kernel's journal commits their
fsyncs together), renamed into new/, and new/ is fsynced once for the whole batch. A
file renamed into new/ whose directory entry is not yet known to be durable is
remembered, and a redelivery of its key fsyncs new/ before it reports the key as taken.

On first use the sink sweeps tmp/ of what killed runs left: files it named itself
(``TIME.MusecPPIDQnKtag.HOST``) on this host whose writer process is gone, and any
file untouched for 36 hours (the Maildir convention, what Dovecot does). Another
program's fresh file in tmp/ is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from popbox.collector.base import FetchedMessage
from popbox.collector.config import MaildirSinkSettings
from popbox.collector.sinks import SinkContext
from popbox.errors import TemporarySinkError
from popbox.fileio import fsync_dir, write_all

__all__ = ["MaildirSink", "create_sink", "crlf_to_lf", "key_tag"]

# Copy in 256 KiB pieces: big enough for throughput, small enough to stay bounded.
COPY_CHUNK: Final = 256 * 1024

# Threads writing and fsyncing one batch: concurrent fsyncs share journal commits (four
# halve the cost per file on one disk; more only queue in the kernel).
BATCH_WRITERS: Final = 4

# Maildir convention (qmail's maildir(5), Dovecot): a file in tmp/ untouched this
# long is a leftover, whoever wrote it.
TMP_STALE_SECONDS: Final = 36 * 3600.0

_KEY_IN_NAME: Final = re.compile(r"K([0-9a-f]{24})")
# The names this sink gives its files in tmp/ (see ``MaildirSink._unique``).
_OUR_TMP_NAME: Final = re.compile(r"\d+\.M\d+P(\d+)Q\d+K[0-9a-f]{24}\.(.+)")
_sequence = itertools.count()

log = logging.getLogger("popbox.collector")


def key_tag(idempotency_key: str) -> str:
    """The part of a file name that identifies a message's idempotency key."""
    return hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:24]


def _discard(paths: Iterable[str | Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive under another user, or not a pid at all: leave it
    return False


def crlf_to_lf(data: bytes) -> bytes:
    """``data`` with each CRLF made LF (a lone CR stays). split/join, not ``replace``:
    CPython's replace of a two-octet pattern by a one-octet one is the slower of the
    two, and it runs with the GIL held."""
    return b"\n".join(data.split(b"\r\n"))


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
            written += write_all(target_fd, crlf_to_lf(data))
    if carry:
        written += write_all(target_fd, carry)
    return written


class MaildirSink:
    """Delivers into one Maildir, creating it when missing."""

    def __init__(self, settings: MaildirSinkSettings) -> None:
        self._settings = settings
        self._root = settings.path
        self._known: set[str] | None = None
        # Keys renamed into new/ whose directory entry is not yet fsynced (a batch that
        # failed between its renames and its directory fsync).
        self._unsynced: set[str] = set()
        # Deliveries run in worker threads, several at once; the first builds the set.
        self._prepare_lock = threading.Lock()
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._pid = os.getpid()
        # Plain strings on the per-message path: pathlib costs more than the syscalls.
        self._tmp_dir = str(self._root / "tmp")
        self._new_dir = str(self._root / "new")

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
            self._sweep_tmp()
            # One listing per run, not per message: the set answers "already here?".
            known: set[str] = set()
            for sub in ("new", "cur"):
                for entry in os.scandir(self._root / sub):
                    match = _KEY_IN_NAME.search(entry.name)
                    if match:
                        known.add(match.group(1))
            if known:
                # A run killed between its renames and its directory fsync left entries
                # the disk may not hold yet; they count as delivered only once it does.
                fsync_dir(self._new_dir)
            self._known = known
        return self._known

    def _sweep_tmp(self) -> None:
        """Remove what killed runs left in tmp/ (see the module's docstring)."""
        now = time.time()
        swept = []
        for entry in os.scandir(self._tmp_dir):
            ours = _OUR_TMP_NAME.fullmatch(entry.name)
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > TMP_STALE_SECONDS
            except FileNotFoundError:
                continue
            writer_gone = (
                ours is not None
                and ours.group(2) == self._host
                and int(ours.group(1)) != self._pid
                and _process_is_gone(int(ours.group(1)))
            )
            if (stale or writer_gone) and entry.is_file(follow_symlinks=False):
                swept.append(entry.path)
        _discard(swept)
        if swept:
            log.info("maildir sink %s: removed %d leftover files from tmp/", self.name, len(swept))

    def _unique(self, tag: str) -> str:
        now = time.time()
        sequence = next(_sequence)
        return f"{int(now)}.M{int(now % 1 * 1e6)}P{self._pid}Q{sequence}K{tag}.{self._host}"

    def _write_tmp(self, message: FetchedMessage, tag: str) -> tuple[str, str]:
        """Write the message durably into tmp/; (tmp path, its path in new/)."""
        unique = self._unique(tag)
        tmp_path = f"{self._tmp_dir}/{unique}"
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if message.data is not None:
                size = write_all(fd, crlf_to_lf(message.data))
            else:
                size = copy_as_lf(message.path, fd)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _discard([tmp_path])
            raise
        os.close(fd)
        return tmp_path, f"{self._new_dir}/{unique},S={size}"

    def _already_here(self, known: set[str], tag: str) -> bool:
        """True when ``tag`` is delivered; a rename not yet made durable is, first."""
        if tag not in known:
            return False
        if tag in self._unsynced:
            fsync_dir(self._new_dir)
            with self._prepare_lock:
                self._unsynced.discard(tag)
        return True

    def _deliver_sync(self, message: FetchedMessage) -> None:
        known = self._prepare()
        tag = key_tag(message.idempotency_key)
        if self._already_here(known, tag):
            return
        tmp_path, final = self._write_tmp(message, tag)
        os.rename(tmp_path, final)
        fsync_dir(self._new_dir)
        known.add(tag)

    def _write_slice(
        self, work: Sequence[tuple[FetchedMessage, str]]
    ) -> list[tuple[str, str, str]]:
        written: list[tuple[str, str, str]] = []
        try:
            for message, tag in work:
                written.append((tag, *self._write_tmp(message, tag)))
        except BaseException:
            _discard(path for _, path, _ in written)
            raise
        return written

    def _publish(self, slices: Sequence[list[tuple[str, str, str]]], resync: bool) -> None:
        """Rename every written file into new/, then make new/ durable once."""
        known = self._prepare()
        moved: set[str] = set()
        try:
            for written in slices:
                for tag, tmp_path, final in written:
                    os.rename(tmp_path, final)
                    with self._prepare_lock:
                        known.add(tag)
                        self._unsynced.add(tag)
                    moved.add(tag)
        finally:
            # Files not renamed (an error above) leave tmp/; a retry writes them anew.
            _discard(
                tmp_path for written in slices for tag, tmp_path, _ in written if tag not in moved
            )
        if moved or resync:
            fsync_dir(self._new_dir)
        with self._prepare_lock:
            self._unsynced.difference_update(moved)

    async def deliver(self, message: FetchedMessage) -> None:
        try:
            await asyncio.to_thread(self._deliver_sync, message)
        except OSError as exc:
            # A full disk or a permission problem may pass; quarantine is for the
            # message's own faults, and nothing about a message makes a Maildir fail.
            raise TemporarySinkError(f"{self.name}: {exc}") from exc

    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> None:
        try:
            known = await asyncio.to_thread(self._prepare)
            work: list[tuple[FetchedMessage, str]] = []
            resync = False
            tags: set[str] = set()
            for message in messages:
                tag = key_tag(message.idempotency_key)
                if tag in known or tag in tags:
                    resync = resync or tag in self._unsynced
                    continue
                tags.add(tag)
                work.append((message, tag))
            share = -(-len(work) // BATCH_WRITERS) or 1
            results = await asyncio.gather(
                *(
                    asyncio.to_thread(self._write_slice, work[start : start + share])
                    for start in range(0, len(work), share)
                ),
                return_exceptions=True,
            )
            slices = [result for result in results if isinstance(result, list)]
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                _discard(path for written in slices for _, path, _ in written)
                raise failure
            await asyncio.to_thread(self._publish, slices, resync)
        except OSError as exc:
            raise TemporarySinkError(f"{self.name}: {exc}") from exc

    async def close(self) -> None:
        if self._unsynced:
            # Keys reported as taken must not vanish with a power loss after we go.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(fsync_dir, self._root / "new")
        self._known = None
        self._unsynced.clear()


def create_sink(settings: MaildirSinkSettings, context: SinkContext) -> MaildirSink:
    return MaildirSink(settings)
