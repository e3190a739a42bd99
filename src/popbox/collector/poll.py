"""One poll of one account: list, decide, fetch, deliver to every sink, record, delete.

The order of durable steps is what makes delivery exactly-once under SIGKILL:

1. the attempt is counted in the state DB (so a poison message's budget runs out);
2. each sink delivers and confirms durably; the DB records that sink (per message);
3. once every sink confirmed, the DB records the message as delivered;
4. only messages recorded as delivered are DELEted, in a batch before QUIT; the DB
   notes the deletion after QUIT's +OK (the server commits before that +OK).

Killed before 2, the next run delivers again. Killed between a sink's write and its
record, the next run offers the message to that sink again with the same idempotency
key, and Maildir and mbox recognise it (see their modules). Killed after DELE and
before QUIT, the server deleted nothing; the next run sees a delivered message and
DELEs it again. A message is delivered when all sinks confirmed; sinks that already
have it are skipped, so a failure of one sink never duplicates into the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Final

from popbox.collector.auth import TokenProvider, build_token_provider, read_password
from popbox.collector.base import BatchSink, FetchedMessage, Sink
from popbox.collector.client import MAX_HEADER_BYTES, Downloaded, Pop3Session
from popbox.collector.config import AccountSettings, FetchSettings
from popbox.collector.quarantine import Quarantine
from popbox.collector.sinks import SinkContext, build_sink
from popbox.collector.state import Delivered, DeliveryRecorder, MessageRecord, StateDB
from popbox.errors import (
    PermanentSinkError,
    PopboxError,
    RemoteServerError,
    SinkError,
)
from popbox.fileio import FileLock, write_all
from popbox.proto.client import ErrReply, UidListing

__all__ = ["PollObserver", "PollResult", "Poller", "header_uid"]

log = logging.getLogger("popbox.collector")

SECONDS_PER_DAY: Final = 86400.0
# Maildir deliveries in flight at once: four overlap the file and directory fsyncs
# well on one disk; more only queue in the kernel.
MAILDIR_PARALLEL: Final = 4
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
# Prefix of uids computed from headers, so they never collide with a server's UIDL.
HEADER_UID_PREFIX: Final = "hdr:"


@dataclass(slots=True)
class PollResult:
    account: str
    delivered: int = 0
    quarantined: int = 0
    skipped: int = 0
    deleted: int = 0
    failed: int = 0
    octets: int = 0
    on_server: int = 0
    pending: int = 0
    error: str | None = None
    error_code: str | None = None
    stopped: bool = False
    login_delay: float | None = None
    """The server's CAPA LOGIN-DELAY (seconds), which the daemon honours."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


class PollObserver:
    """Progress hooks (the CLI's progress bar); the defaults do nothing."""

    def planned(self, account: str, messages: int, octets: int) -> None:
        return None

    def message_done(self, account: str, octets: int, outcome: str) -> None:
        return None


def header_uid(data: bytes) -> str:
    """A uid from the header section (of TOP n 0 output or a whole message), for
    servers whose UIDLs cannot be trusted."""
    headers = data.split(b"\r\n\r\n", 1)[0]
    return HEADER_UID_PREFIX + hashlib.sha256(headers).hexdigest()[:40]


def _header_uid_of(message: FetchedMessage) -> str:
    if message.data is not None:
        return header_uid(message.data[:MAX_HEADER_BYTES])
    return _header_uid_of_file(message.path)


def _spill(items: Iterable[Downloaded | FetchedMessage]) -> None:
    """Write bodies held in memory to their spool path, for code that reads files."""
    for item in items:
        if item.data is not None and not item.path.exists():
            fd = os.open(item.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, item.data)
            finally:
                os.close(fd)


def _header_uid_of_file(path: Path) -> str:
    with path.open("rb") as handle:
        return header_uid(handle.read(MAX_HEADER_BYTES))


def _filter_decision(account: AccountSettings, headers: bytes) -> str:
    parsed = BytesHeaderParser(policy=default_policy).parsebytes(headers)
    for rule in account.filters:
        for value in parsed.get_all(rule.header, []):
            if re.search(rule.pattern, str(value)):
                return rule.action
    return account.filter_default


class Poller:
    """Polls one account once; create a new one per poll."""

    def __init__(
        self,
        account: AccountSettings,
        settings: FetchSettings,
        db: StateDB,
        *,
        sinks: Sequence[Sink] | None = None,
        tokens: TokenProvider | None = None,
        stop: asyncio.Event | None = None,
        observer: PollObserver | None = None,
    ) -> None:
        self.account = account
        self.settings = settings
        self.db = db
        self.quarantine = Quarantine(settings.quarantine_path)
        context = SinkContext(account=account, settings=settings)
        self.sinks = (
            list(sinks)
            if sinks is not None
            else [build_sink(sink, context) for sink in account.sinks]
        )
        self._timeouts = [sink.timeout for sink in account.sinks]
        self._tokens = tokens
        self._stop = stop or asyncio.Event()
        self._observer = observer or PollObserver()
        self._spool = settings.spool_path / account.name
        self.result = PollResult(account.name)
        self._recorder = DeliveryRecorder(db)

    # ---------------------------------------------------------------- the run

    async def run(self, *, retry_quarantined: bool = False) -> PollResult:
        name = self.account.name
        locks = self.settings.state_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        try:
            # One poll of an account at a time, machine-wide (and within one process).
            lock = FileLock(locks / f"{name}.lock")
        except BlockingIOError:
            # A cron run overlapping a daemon: polling the same account twice at once
            # could hand a message to a sink twice, so the later one steps aside.
            self.result.notes.append("skipped: another collector is polling this account")
            log.info("skipped account=%s reason=locked-by-another-collector", name)
            return self.result
        with lock:
            return await self._locked_run(retry_quarantined)

    async def _locked_run(self, retry_quarantined: bool) -> PollResult:
        name = self.account.name
        self.db.run_started(name)
        try:
            await self._run(retry_quarantined)
        except PopboxError as exc:
            # ConfigError too: a missing password variable fails this account only.
            self.result.error = str(exc)
            self.result.error_code = exc.code if isinstance(exc, RemoteServerError) else None
            log.warning("poll failed account=%s error=%s", name, exc)
        except OSError as exc:
            # The local side (a full spool disk): this account fails, the others go on.
            self.result.error = f"local I/O error: {exc}"
            log.warning("poll failed account=%s error=%s", name, self.result.error)
        finally:
            for sink in self.sinks:
                with contextlib.suppress(Exception):
                    await sink.close()
        self.db.run_finished(
            name,
            error=self.result.error,
            on_server=self.result.on_server,
            pending=self.result.pending,
        )
        log.info(
            "poll done account=%s delivered=%d quarantined=%d skipped=%d deleted=%d "
            "failed=%d octets=%d pending=%d",
            name,
            self.result.delivered,
            self.result.quarantined,
            self.result.skipped,
            self.result.deleted,
            self.result.failed,
            self.result.octets,
            self.result.pending,
        )
        return self.result

    async def _run(self, retry_quarantined: bool) -> None:
        name = self.account.name
        retried: set[str] = set()
        if retry_quarantined:
            for record in self.db.quarantined(name):
                self.db.clear_quarantine(name, record.uid)
                retried.add(record.uid)
        session = await Pop3Session.open(self.account)
        delay = session.capabilities.items.get("LOGIN-DELAY", ())
        if delay and delay[0].isdigit():
            self.result.login_delay = float(delay[0])
        try:
            await self._login(session)
            sizes, listing = await session.listing()
            uids = await self._uids(session, sizes, listing)
            self.result.on_server = len(uids)
            await self._retry_from_quarantine(retried - set(uids.values()))
            await self._transaction(session, sizes, uids, retried)
        except BaseException:
            await session.close()
            raise

    async def _login(self, session: Pop3Session) -> None:
        if self.account.auth == "oauth2":
            tokens = self._tokens or build_token_provider(self.account, self.settings)
            await session.login_oauth(tokens)
        else:
            password = await asyncio.to_thread(read_password, self.account)
            await session.login_password(password)

    async def _uids(
        self, session: Pop3Session, sizes: dict[int, int], listing: UidListing | None
    ) -> dict[int, str]:
        """Message number -> uid: the server's UIDL, or a header hash when it fails."""
        source = self.account.uid_source
        reason = None
        if source == "header_hash":
            reason = "configured"
        elif listing is None:
            reason = "server has no UIDL"
        elif listing.problems:
            reason = "; ".join(listing.problems[:3])
        elif source == "auto":
            known = self.db.records(self.account.name)
            for number, uid in listing.entries:
                record = known.get(uid)
                # Same UIDL, different size: the server reuses or changes UIDLs.
                if record is not None and record.size and record.size != sizes.get(number):
                    reason = f"UIDL {uid} changed size"
                    break
        if reason is None:
            assert listing is not None
            return dict(listing.entries)
        log.info("using header hashes account=%s reason=%s", self.account.name, reason)
        self.result.notes.append(f"header-hash uids: {reason}")
        uids: dict[int, str] = {}
        seen: dict[str, int] = {}
        async for number, headers in session.headers(sorted(sizes)):
            uid = header_uid(headers)
            count = seen.get(uid, 0) + 1
            seen[uid] = count
            # Identical headers (a message sent twice): tell copies apart by order.
            uids[number] = uid if count == 1 else f"{uid}#{count}"
        await session.finish_pending()
        if len(uids) != len(sizes):
            raise RemoteServerError("TOP failed; the server has no usable unique-ids")
        adopted = self.db.adopt_header_uids(self.account.name, set(uids.values()))
        if adopted:
            log.info("recognised %d delivered messages by their headers", adopted)
        return uids

    def _plan(
        self, sizes: dict[int, int], uids: dict[int, str]
    ) -> tuple[list[int], list[int], set[int]]:
        """(numbers to fetch, numbers to delete, numbers to quarantine as oversize)."""
        account, now = self.account, time.time()
        known = self.db.records(account.name)
        self.db.note_listing(
            account.name,
            [(uid, sizes.get(number, 0)) for number, uid in uids.items() if uid not in known],
        )
        fetch: list[int] = []
        delete: list[int] = []
        oversize: set[int] = set()
        octets = 0
        for number in sorted(uids):
            uid, size = uids[number], sizes.get(number, 0)
            record: MessageRecord | None = known.get(uid)
            if record is not None and record.delivered_at is not None:
                if account.delete == "after_delivery" or (
                    account.delete == "after_days"
                    and now - record.delivered_at > account.delete_after_days * SECONDS_PER_DAY
                ):
                    delete.append(number)
                continue
            if record is not None and (record.quarantined or record.skipped):
                continue
            if account.max_message_size and size > account.max_message_size:
                if account.oversize == "skip":
                    self.db.record_skipped(account.name, uid, size, "oversize")
                    self.result.skipped += 1
                    log.info(
                        "skipped account=%s uid=%s size=%d reason=oversize", account.name, uid, size
                    )
                    continue
                oversize.add(number)
            if account.max_messages_per_run and len(fetch) >= account.max_messages_per_run:
                continue
            if account.max_bytes_per_run and octets >= account.max_bytes_per_run:
                continue
            fetch.append(number)
            octets += size
        return fetch, delete, oversize

    async def _transaction(
        self,
        session: Pop3Session,
        sizes: dict[int, int],
        uids: dict[int, str],
        retried: set[str],
    ) -> None:
        name = self.account.name
        fetch, delete, oversize = self._plan(sizes, uids)
        if self.account.filters and fetch:
            fetch = await self._apply_filters(session, fetch, sizes, uids)
        self._observer.planned(name, len(fetch), sum(sizes.get(n, 0) for n in fetch))
        after_delivery = self.account.delete == "after_delivery"
        self._spool.mkdir(parents=True, exist_ok=True)
        batching = bool(self.sinks) and all(isinstance(s, BatchSink) for s in self.sinks)

        def done(number: int, size: int, outcome: str) -> None:
            uid = uids[number]
            if outcome == "delivered" and uid in retried:
                self.quarantine.remove(name, uid)
            if outcome == "delivered" and after_delivery:
                delete.append(number)
            self._observer.message_done(name, size, outcome)

        if batching:
            await self._batched(session, fetch, sizes, uids, oversize, done)
        else:
            await self._one_by_one(session, fetch, sizes, uids, oversize, done)
        await session.finish_pending()
        if delete:
            await session.delete(delete)
        await session.quit()
        if delete:
            self.db.record_deleted(name, [uids[n] for n in delete])
            self.result.deleted = len(delete)
        records = self.db.records(name)
        self.result.pending = sum(
            1
            for uid in uids.values()
            if (record := records.get(uid)) is None
            or (record.delivered_at is None and not record.quarantined and not record.skipped)
        )

    async def _one_by_one(
        self,
        session: Pop3Session,
        fetch: list[int],
        sizes: dict[int, int],
        uids: dict[int, str],
        oversize: set[int],
        done: Callable[[int, int, str], None],
    ) -> None:
        """Deliver each message on its own (sinks without batches), overlapping the
        download of the next bodies with the sinks' work on this one."""
        # The queue keeps the order and bounds the spool.
        queue: asyncio.Queue[Downloaded | tuple[int, ErrReply] | None] = asyncio.Queue(
            maxsize=session.window
        )
        downloader = asyncio.create_task(self._download(session, fetch, sizes, queue))
        # Maildir deliveries of different messages are independent (unique names, no
        # shared lock), so several run at once and their fsyncs overlap. Other sinks
        # take messages one at a time, in server order (a ticket system may care).
        parallel = MAILDIR_PARALLEL if all(s.kind == "maildir" for s in self.account.sinks) else 1
        slots = asyncio.Semaphore(parallel)
        running: set[asyncio.Task[None]] = set()

        async def handle(item: Downloaded) -> None:
            try:
                uid = uids[item.number]
                try:
                    outcome = await self._handle(item, uid, item.number in oversize)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(item.path)
                done(item.number, item.size, outcome)
            finally:
                slots.release()

        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Downloaded):
                    await slots.acquire()
                    task = asyncio.create_task(handle(item))
                    running.add(task)
                    task.add_done_callback(running.discard)
                else:
                    self._retr_failed(uids, *item)
                if self._stop.is_set():
                    self.result.stopped = True
                    break
        finally:
            # Messages in the sinks' hands finish (a stop waits for them, too).
            finished = await asyncio.gather(*running, return_exceptions=True)
            await self._stop_download(downloader, queue)
        for outcome in finished:
            if isinstance(outcome, BaseException):
                raise outcome
        self._raise_download_failure(downloader)

    async def _batched(
        self,
        session: Pop3Session,
        fetch: list[int],
        sizes: dict[int, int],
        uids: dict[int, str],
        oversize: set[int],
        done: Callable[[int, int, str], None],
    ) -> None:
        """Deliver in batches: while batches are made durable (files, one directory
        fsync, one state commit each), the next downloads; its size follows the disk.
        Two batches run at once, so one's directory fsync and state commits overlap
        the other's file writes instead of leaving the disk idle."""
        queue: asyncio.Queue[Downloaded | tuple[int, ErrReply] | None] = asyncio.Queue(
            maxsize=BATCH_MAX_MESSAGES
        )
        downloader = asyncio.create_task(
            self._download(session, fetch, sizes, queue, keep_below=MEMORY_BODY_MAX)
        )
        batch: list[Downloaded] = []
        # Oldest first; each batch is made durable and recorded on its own, so two at
        # once change nothing about what a crash leaves.
        in_flight: collections.deque[asyncio.Task[None]] = collections.deque()
        try:
            finished = False
            while not finished:
                item: Downloaded | tuple[int, ErrReply] | None = await queue.get()
                octets = 0
                while True:
                    if item is None:
                        finished = True
                        break
                    if isinstance(item, Downloaded):
                        batch.append(item)
                        octets += item.size
                    else:
                        self._retr_failed(uids, *item)
                    if (
                        len(batch) >= BATCH_MAX_MESSAGES
                        or octets >= BATCH_MAX_OCTETS
                        or queue.empty()
                    ):
                        break
                    item = queue.get_nowait()
                if batch:
                    in_flight.append(
                        asyncio.create_task(self._deliver_downloads(batch, uids, oversize, done))
                    )
                    batch = []
                    if len(in_flight) >= BATCHES_IN_FLIGHT:
                        await in_flight.popleft()
                if self._stop.is_set():
                    self.result.stopped = True
                    break
        finally:
            _unlink_spooled(batch)
            # Batches in the sinks' hands finish (a stop or an error waits for them).
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            await self._stop_download(downloader, queue)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        self._raise_download_failure(downloader)

    async def _deliver_downloads(
        self,
        items: list[Downloaded],
        uids: dict[int, str],
        oversize: set[int],
        done: Callable[[int, int, str], None],
    ) -> None:
        try:
            hashed = await asyncio.to_thread(_with_digests, items)
            normal = [item for item in hashed if item.number not in oversize]
            for item in hashed:
                if item.number in oversize:
                    await asyncio.to_thread(_spill, [item])  # the quarantine copies a file
                    try:
                        outcome = await self._handle(item, uids[item.number], True)
                    finally:
                        _unlink_spilled([item])
                    done(item.number, item.size, outcome)
            if normal:
                messages = [
                    FetchedMessage(
                        self.account.name, uids[i.number], i.size, i.digest, i.path, i.data
                    )
                    for i in normal
                ]
                outcomes = await self.deliver_batch(messages)
                for item, outcome in zip(normal, outcomes, strict=True):
                    done(item.number, item.size, outcome)
        finally:
            _unlink_spooled(items)

    def _retr_failed(self, uids: dict[int, str], number: int, reply: ErrReply) -> None:
        self.result.failed += 1
        self.db.record_failure(self.account.name, uids[number], f"RETR: {reply.text}")
        log.warning("RETR failed account=%s number=%d: %s", self.account.name, number, reply.text)

    @staticmethod
    async def _stop_download(
        downloader: asyncio.Task[None],
        queue: asyncio.Queue[Downloaded | tuple[int, ErrReply] | None],
    ) -> None:
        if not downloader.done():
            downloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([downloader])
        # Bodies downloaded but not delivered (a stop, an error) leave the spool.
        while not queue.empty():
            left = queue.get_nowait()
            if isinstance(left, Downloaded):
                _unlink_spooled([left])

    @staticmethod
    def _raise_download_failure(downloader: asyncio.Task[None]) -> None:
        if not downloader.cancelled():
            failure = downloader.exception()
            if failure is not None:
                raise failure

    async def _download(
        self,
        session: Pop3Session,
        fetch: list[int],
        sizes: dict[int, int],
        queue: asyncio.Queue[Downloaded | tuple[int, ErrReply] | None],
        *,
        keep_below: int = 0,
    ) -> None:
        bodies = session.retrieve(fetch, sizes, self._spool, keep_below=keep_below)
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

    async def _apply_filters(
        self, session: Pop3Session, fetch: list[int], sizes: dict[int, int], uids: dict[int, str]
    ) -> list[int]:
        keep: list[int] = []
        async for number, headers in session.headers(fetch):
            if _filter_decision(self.account, headers) == "fetch":
                keep.append(number)
            else:
                self.db.record_skipped(self.account.name, uids[number], sizes[number], "filter")
                self.result.skipped += 1
        await session.finish_pending()
        return keep

    # ---------------------------------------------------------------- one message

    async def _handle(self, item: Downloaded, uid: str, oversize: bool) -> str:
        message = FetchedMessage(self.account.name, uid, item.size, item.digest, item.path)
        self.result.octets += item.size
        if oversize:
            await self.db.call(self.db.start_attempt, self.account.name, uid, item.size)
            return self._quarantine(message, f"over max_message_size ({item.size} octets)")
        return await self.deliver(message)

    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> list[str]:
        """``deliver`` for several messages, made durable together: each sink takes the
        messages it lacks as one batch, and one state commit records them all. A batch
        a sink fails is offered again message by message (so one bad message is
        quarantined alone, as ``deliver`` would). Outcomes in the order given."""
        name = self.account.name
        for message in messages:
            self.result.octets += message.size
        attempts, sinks_done = await self.db.call(
            self._begin_batch, name, [(m.uidl, m.size) for m in messages]
        )
        last: dict[str, str] = {}
        try:
            for index, sink in enumerate(self.sinks):
                assert isinstance(sink, BatchSink)
                lacking = [m for m in messages if sink.name not in sinks_done.get(m.uidl, ())]
                if not lacking:
                    continue
                timeout = self._timeouts[index] if index < len(self._timeouts) else 60.0
                try:
                    # The per-message timeout, for each message of the batch.
                    await asyncio.wait_for(sink.deliver_batch(lacking), timeout * len(lacking))
                except TimeoutError as exc:
                    raise SinkError(f"{sink.name}: batch not taken in time") from exc
                earlier = [(m.uidl, last[m.uidl]) for m in lacking if m.uidl in last]
                if earlier:
                    await self.db.call(self.db.record_sinks, name, earlier)
                # The last confirmation is recorded with "delivered", in one commit.
                last.update((m.uidl, sink.name) for m in lacking)
        except Exception as exc:
            if not isinstance(exc, SinkError):
                log.exception("sink raised unexpectedly account=%s batch", name)
            log.info(
                "batch failed account=%s messages=%d: %s; one by one", name, len(messages), exc
            )
            if last:
                await self.db.call(self.db.record_sinks, name, list(last.items()))
            # One by one, sinks (and the quarantine) read files: write out what is held.
            await asyncio.to_thread(_spill, messages)
            try:
                return [
                    await self.deliver(message, attempts=attempts[message.uidl], counted=True)
                    for message in messages
                ]
            finally:
                _unlink_spilled(messages)
        rows = await asyncio.to_thread(
            lambda: [
                Delivered(name, m.uidl, m.sha256, last.get(m.uidl), _header_uid_of(m))
                for m in messages
            ]
        )
        await self.db.call(self.db.record_delivered_many, rows)
        log.debug("batch delivered account=%s messages=%d", name, len(messages))
        for message in messages:
            log.info("delivered account=%s uid=%s size=%d", name, message.uidl, message.size)
        self.result.delivered += len(messages)
        return ["delivered"] * len(messages)

    def _begin_batch(
        self, name: str, entries: list[tuple[str, int]]
    ) -> tuple[dict[str, int], dict[str, set[str]]]:
        attempts = self.db.start_attempts(name, entries)
        return attempts, self.db.sinks_done_many(name, attempts)

    async def deliver(
        self, message: FetchedMessage, *, attempts: int = 0, counted: bool = False
    ) -> str:
        """Offer the message to every sink that lacks it; "delivered", "quarantined" or
        "failed" (temporary; retried next run). ``counted``: this attempt is already
        counted (``attempts``), as when a failed batch retries its messages."""
        name, uid = self.account.name, message.uidl
        if counted:
            done = await self.db.call(self.db.sinks_done, name, uid)
        else:
            attempts, done = await self.db.call(self._begin, name, uid, message.size)
        last: str | None = None
        try:
            for index, sink in enumerate(self.sinks):
                if sink.name in done:
                    continue
                timeout = self._timeouts[index] if index < len(self._timeouts) else 60.0
                try:
                    await asyncio.wait_for(sink.deliver(message), timeout)
                except TimeoutError as exc:
                    raise SinkError(f"{sink.name}: no answer within {timeout:g}s") from exc
                if last is not None:
                    await self.db.call(self.db.record_sink, name, uid, last)
                # The last confirmation is recorded with "delivered", in one commit.
                last = sink.name
        except PermanentSinkError as exc:
            return self._quarantine(message, str(exc))
        except Exception as exc:  # a sink bug must not stop the queue: count it
            if not isinstance(exc, SinkError):
                log.exception("sink raised unexpectedly account=%s uid=%s", name, uid)
            if attempts >= self.account.max_attempts:
                return self._quarantine(message, f"gave up after {attempts} attempts: {exc}")
            self.db.record_failure(name, uid, str(exc))
            self.result.failed += 1
            log.warning(
                "delivery failed account=%s uid=%s attempt=%d: %s", name, uid, attempts, exc
            )
            return "failed"
        header = await asyncio.to_thread(_header_uid_of_file, message.path)
        await self._recorder.record(Delivered(name, uid, message.sha256, last, header))
        self.result.delivered += 1
        log.info("delivered account=%s uid=%s size=%d", name, uid, message.size)
        return "delivered"

    # Before the sinks: count the attempt and learn which sinks have it, one thread trip.

    def _begin(self, name: str, uid: str, size: int) -> tuple[int, set[str]]:
        return self.db.start_attempt(name, uid, size), self.db.sinks_done(name, uid)

    def _quarantine(self, message: FetchedMessage, reason: str) -> str:
        name = self.account.name
        path = self.quarantine.save(
            account=name,
            uid=message.uidl,
            source=message.path,
            sha256=message.sha256,
            size=message.size,
            reason=reason,
        )
        self.db.record_quarantined(name, message.uidl, reason, message.sha256)
        self.result.quarantined += 1
        log.warning(
            "quarantined account=%s uid=%s path=%s reason=%s", name, message.uidl, path, reason
        )
        return "quarantined"

    async def _retry_from_quarantine(self, uids: set[str]) -> None:
        """Re-offer quarantined messages that are no longer on the server, from the copy."""
        for uid in sorted(uids):
            path = self.quarantine.load(self.account.name, uid)
            if path is None:
                continue
            data_hash, size = await asyncio.to_thread(_hash_file, path)
            message = FetchedMessage(self.account.name, uid, size, data_hash, path)
            if await self.deliver(message) == "delivered":
                self.quarantine.remove(self.account.name, uid)


def _with_digests(items: list[Downloaded]) -> list[Downloaded]:
    return [item.with_digest() for item in items]


def _unlink_spooled(items: Iterable[Downloaded]) -> None:
    """Remove spool files; a body held in memory has none (``_spill`` writes one only
    for the moment it is needed, and ``_unlink_spilled`` removes it)."""
    for item in items:
        if item.data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.path)


def _unlink_spilled(items: Iterable[Downloaded | FetchedMessage]) -> None:
    for item in items:
        if item.data is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.path)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
