"""Taking a user's old mail into the archive (``popbox archive import``).

Messages come from popbox.archive.sources and go to ``Archive.add_batch`` in batches
(one folder per batch, at most BATCH_MESSAGES messages or BATCH_OCTETS octets), so
an import of a hundred thousand messages is a few hundred durable commits, not a
hundred thousand. The next batch is read while the last one is kept.

Running an import again is safe and is how a killed one is finished: the archive
keeps a message once per user, so what the first run kept is counted as ``kept``
(already in the archive) and not stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from popbox.archive.base import Archive, ArchiveSource
from popbox.archive.sources import Expunged, SourceItem, SourceMessage, Unreadable, read_source

__all__ = ["BATCH_MESSAGES", "BATCH_OCTETS", "ImportReport", "import_path"]

# Messages made durable together: one fsync and one index commit per batch, small
# enough that a killed import loses little work and a batch's list stays short.
BATCH_MESSAGES: Final = 200
# Octets per batch at most (a folder of large attachments commits as often as its
# size, not its count, says).
BATCH_OCTETS: Final = 32 * 1024 * 1024
# Problems listed by name in a report; the rest are counted.
MAX_LISTED: Final = 20


@dataclass(slots=True)
class ImportReport:
    """What an import did: messages newly kept, already kept (from an earlier import
    or twice in the source), unreadable, and deleted in Thunderbird (passed over)."""

    new: int = 0
    kept: int = 0
    unreadable: int = 0
    expunged: int = 0
    octets: int = 0
    """Octets of the messages read (new and already kept)."""
    problems: list[Unreadable] = field(default_factory=list)

    @property
    def messages(self) -> int:
        return self.new + self.kept

    def describe(self) -> str:
        text = f"{self.new} new, {self.kept} already kept, {self.unreadable} unreadable"
        if self.expunged:
            text += f", {self.expunged} deleted in Thunderbird (skipped)"
        return text


@dataclass(frozen=True, slots=True)
class _Batch:
    folder: str
    messages: list[SourceMessage]


class _Batcher:
    """Groups the source's messages into batches; counts what is not a message."""

    def __init__(self, items: Iterator[SourceItem], report: ImportReport) -> None:
        self._items = items
        self._report = report
        self._next: SourceMessage | None = None

    def take(self) -> _Batch | None:
        """The next batch, or None at the end (runs in a worker thread: it reads)."""
        messages: list[SourceMessage] = []
        octets = 0
        while len(messages) < BATCH_MESSAGES and octets < BATCH_OCTETS:
            message = self._next if self._next is not None else self._read()
            self._next = None
            if message is None:
                break
            if messages and message.folder != messages[0].folder:
                self._next = message
                break
            messages.append(message)
            octets += message.size
        if not messages:
            return None
        return _Batch(messages[0].folder, messages)

    def _read(self) -> SourceMessage | None:
        for item in self._items:
            if isinstance(item, SourceMessage):
                return item
            if isinstance(item, Expunged):
                self._report.expunged += 1
            else:
                self._report.unreadable += 1
                if len(self._report.problems) < MAX_LISTED:
                    self._report.problems.append(item)
        return None


async def import_path(
    archive: Archive,
    user: str,
    path: Path,
    *,
    folder: str | None = None,
    progress: Callable[[ImportReport], None] | None = None,
) -> ImportReport:
    """Keep every message under ``path`` for ``user`` (see popbox.archive.sources for
    what a path may be); ``progress(report)`` after each batch.

    ArchiveError if ``path`` is no mail source, or as the archive raises it.
    """
    report = ImportReport()
    with tempfile.TemporaryDirectory(prefix="popbox-import-") as spool:
        batcher = _Batcher(read_source(path, Path(spool), folder), report)
        pending = asyncio.ensure_future(asyncio.to_thread(batcher.take))
        try:
            while (batch := await pending) is not None:
                # Read the next batch from disk while this one is made durable.
                pending = asyncio.ensure_future(asyncio.to_thread(batcher.take))
                try:
                    added = await archive.add_batch(
                        user,
                        [message.content for message in batch.messages],
                        source=ArchiveSource.IMPORTED,
                        folder=batch.folder,
                    )
                finally:
                    _remove_spooled(batch.messages)
                for result in added:
                    if result.new:
                        report.new += 1
                    else:
                        report.kept += 1
                report.octets += sum(message.size for message in batch.messages)
                if progress is not None:
                    progress(report)
        finally:
            # The reader thread cannot be cancelled; let it finish before the spool goes.
            if not pending.done():
                with contextlib.suppress(Exception):
                    batch = await pending
                    if batch is not None:
                        _remove_spooled(batch.messages)
    return report


def _remove_spooled(messages: list[SourceMessage]) -> None:
    for message in messages:
        if message.spooled and isinstance(message.content, Path):
            message.content.unlink(missing_ok=True)
