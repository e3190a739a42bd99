"""The download pipeline: RETR bodies into a bounded queue, hand them over in batches.

One path for every account. While batches are in the sinks' hands, the next bodies
download; a batch closes at its shape's message or octet bound, or when nothing more
has arrived. Sinks that take batches (Maildirs: one directory fsync and one state
commit for many messages) get large ones, several at once; other sinks get batches
of one, one at a time, in server order (a ticket system may care).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.collector.client import Downloaded, Pop3Session
from popbox.proto.client import ErrReply

__all__ = [
    "BATCHES_IN_FLIGHT",
    "BATCH_MAX_MESSAGES",
    "BATCH_MAX_OCTETS",
    "MEMORY_BODY_MAX",
    "BatchShape",
    "DownloadPipeline",
]

# A batch (sinks that all take batches, e.g. Maildirs) closes at this many messages or
# octets: big enough that one directory fsync and one state commit serve many
# messages, small enough to bound the spool and what a crash makes the next run redo.
BATCH_MAX_MESSAGES: Final = 256
BATCH_MAX_OCTETS: Final = 64 * 1024 * 1024
# Batches being made durable at once: a second one keeps the disk busy with its file
# writes while the first waits on its directory fsync and state commits.
BATCHES_IN_FLIGHT: Final = 2
# Bodies LIST calls smaller than this stay in memory on their way to batch sinks (no
# spool file to create, write, read and remove); with BATCH_MAX_MESSAGES queued and
# BATCHES_IN_FLIGHT batches in the sinks' hands that is at most 192 MiB, typically a few.
MEMORY_BODY_MAX: Final = 256 * 1024

Queued = Downloaded | tuple[int, ErrReply] | None
HandOver = Callable[[list[Downloaded]], Awaitable[None]]
RetrFailed = Callable[[int, ErrReply], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BatchShape:
    """How the pipeline cuts the download for the sinks it feeds."""

    max_messages: int
    max_octets: int
    in_flight: int
    memory_body_max: int
    """Bodies below this many (LIST) octets stay in memory; 0: every body is spooled."""

    @classmethod
    def for_sinks(cls, take_batches: bool) -> BatchShape:
        if take_batches:
            return cls(BATCH_MAX_MESSAGES, BATCH_MAX_OCTETS, BATCHES_IN_FLIGHT, MEMORY_BODY_MAX)
        # One message at a time, in order, from a spool file (such sinks read files).
        return cls(1, BATCH_MAX_OCTETS, 1, 0)


class DownloadPipeline:
    """Downloads the planned messages of one session and hands each batch over.

    ``hand_over`` gets the bodies of one batch with their digests; their spool files
    are removed once it returns, whatever happened. A failed RETR goes to
    ``retr_failed`` and the rest goes on. A set ``stop`` ends the run after the batch
    in hand; batches already handed over finish first.
    """

    def __init__(
        self, session: Pop3Session, spool: Path, shape: BatchShape, stop: asyncio.Event
    ) -> None:
        self._session = session
        self._spool = spool
        self._shape = shape
        self._stop = stop

    async def run(
        self,
        numbers: list[int],
        sizes: dict[int, int],
        hand_over: HandOver,
        retr_failed: RetrFailed,
    ) -> bool:
        """Download and hand over ``numbers``; True when a stop cut the run short."""
        shape = self._shape
        # The queue keeps the order and bounds the spool.
        queue: asyncio.Queue[Queued] = asyncio.Queue(
            maxsize=max(self._session.window, shape.max_messages)
        )
        downloader = asyncio.create_task(self._download(numbers, sizes, queue))
        batch: list[Downloaded] = []
        # Oldest first; each batch is made durable and recorded on its own, so several
        # at once change nothing about what a crash leaves.
        in_flight: deque[asyncio.Task[None]] = deque()
        stopped = False
        try:
            finished = False
            while not finished:
                item: Queued = await queue.get()
                octets = 0
                while True:
                    if item is None:
                        finished = True
                        break
                    if isinstance(item, Downloaded):
                        batch.append(item)
                        octets += item.size
                    else:
                        await retr_failed(*item)
                    if (
                        len(batch) >= shape.max_messages
                        or octets >= shape.max_octets
                        or queue.empty()
                    ):
                        break
                    item = queue.get_nowait()
                if batch:
                    in_flight.append(asyncio.create_task(_handed_over(batch, hand_over)))
                    batch = []
                    if len(in_flight) >= shape.in_flight:
                        await in_flight.popleft()
                if self._stop.is_set():
                    stopped = True
                    break
        finally:
            unlink_spooled(batch)
            # Batches in the sinks' hands finish (a stop or an error waits for them).
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            await _stop_download(downloader, queue)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if not downloader.cancelled() and (failure := downloader.exception()) is not None:
            raise failure
        return stopped

    async def _download(
        self, numbers: list[int], sizes: dict[int, int], queue: asyncio.Queue[Queued]
    ) -> None:
        bodies = self._session.retrieve(
            numbers, sizes, self._spool, keep_below=self._shape.memory_body_max
        )
        try:
            async with contextlib.aclosing(bodies) as stream:
                async for item in stream:
                    await queue.put(item)
        except asyncio.CancelledError:
            raise  # the consumer stopped; it wants no end marker
        except BaseException:
            await queue.put(None)  # the consumer delivers what came, then sees the error
            raise
        await queue.put(None)


async def _handed_over(items: list[Downloaded], hand_over: HandOver) -> None:
    try:
        if any(item.sha256 is None for item in items):
            # Bodies held in memory are hashed off the loop (see Downloaded).
            items = await asyncio.to_thread(_with_digests, items)
        await hand_over(items)
    finally:
        unlink_spooled(items)


async def _stop_download(downloader: asyncio.Task[None], queue: asyncio.Queue[Queued]) -> None:
    if not downloader.done():
        downloader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait([downloader])
    # Bodies downloaded but not delivered (a stop, an error) leave the spool.
    while not queue.empty():
        left = queue.get_nowait()
        if isinstance(left, Downloaded):
            unlink_spooled([left])


def _with_digests(items: list[Downloaded]) -> list[Downloaded]:
    return [item.with_digest() for item in items]


def unlink_spooled(items: Iterable[Downloaded]) -> None:
    """Remove spool files; a body held in memory has none (the hand-off writes one only
    for the moment it needs it, and removes it)."""
    for item in items:
        if item.data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.path)
