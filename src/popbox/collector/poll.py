"""One poll of one account: list, decide, fetch, deliver to every sink, record, delete.

``Poller`` runs the steps in order: login, planning (``plan``), the download pipeline
(``pipeline``), the hand-off to the sinks (``handoff``, steps 1 to 3 below), then DELE,
QUIT and the deletion record (step 4), under a per-account lock.

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
import contextlib
import hashlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from popbox.collector.auth import build_token_provider, read_password
from popbox.collector.base import FetchedMessage, LocalDeliveryFactory, Sink
from popbox.collector.client import Downloaded, Pop3Session
from popbox.collector.config import AccountSettings, FetchSettings
from popbox.collector.handoff import Handoff, Outcome
from popbox.collector.pipeline import BatchShape, DownloadPipeline
from popbox.collector.plan import Plan, apply_filters, make_plan, message_uids, pending
from popbox.collector.quarantine import Quarantine
from popbox.collector.sinks import SinkContext, build_sink
from popbox.collector.state import CollectorState
from popbox.collector.tokens import TokenProvider
from popbox.errors import OAuthLoginRequired, PopboxError, RemoteServerError
from popbox.fileio import FileLock
from popbox.proto.client import ErrReply

__all__ = ["PollObserver", "PollResult", "Poller"]

log = logging.getLogger("popbox.collector")


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
    login_required: bool = False
    """An OAuth login (the account's or a sink's) needs signing in again; ``error``
    names the command that does it."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def count(self, outcome: Outcome) -> None:
        if outcome == "delivered":
            self.delivered += 1
        elif outcome == "quarantined":
            self.quarantined += 1
        else:
            self.failed += 1


class PollObserver:
    """Progress hooks (the CLI's progress bar); the defaults do nothing."""

    def planned(self, account: str, messages: int, octets: int) -> None:
        return None

    def message_done(self, account: str, octets: int, outcome: str) -> None:
        return None


class Poller:
    """Polls one account once; create a new one per poll. ``state`` is the collector's
    state DB (the command line builds the SQLite one), shared by the polls of a process."""

    def __init__(
        self,
        account: AccountSettings,
        settings: FetchSettings,
        state: CollectorState,
        *,
        sinks: Sequence[Sink] | None = None,
        local_delivery: LocalDeliveryFactory | None = None,
        tokens: TokenProvider | None = None,
        stop: asyncio.Event | None = None,
        observer: PollObserver | None = None,
    ) -> None:
        self.account = account
        self.settings = settings
        self.state = state
        self.quarantine = Quarantine(settings.quarantine_path)
        # Sinks not handed in are built from the account's settings; a popbox sink
        # needs the composition root's way into local mailboxes (``local_delivery``).
        context = SinkContext(account, settings, local_delivery=local_delivery)
        self.sinks = (
            list(sinks)
            if sinks is not None
            else [build_sink(sink, context) for sink in account.sinks]
        )
        self.handoff = Handoff(account, state, self.sinks, self.quarantine)
        self._tokens = tokens
        self._stop = stop or asyncio.Event()
        self._observer = observer or PollObserver()
        self._spool = settings.spool_path / account.name
        self.result = PollResult(account.name)

    # ---------------------------------------------------------------- the run

    async def run(
        self, *, retry_quarantined: bool = False, retry_uids: Collection[str] = ()
    ) -> PollResult:
        """Poll once. ``retry_quarantined`` offers every quarantined message of the
        account again, ``retry_uids`` just those (the others stay set aside)."""
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
            return await self._locked_run(retry_quarantined, frozenset(retry_uids))

    async def _locked_run(self, retry_all: bool, retry_uids: frozenset[str]) -> PollResult:
        name = self.account.name
        await self.state.run_started(name)
        try:
            await self._run(retry_all, retry_uids)
        except OAuthLoginRequired as exc:
            # Retrying cannot help until someone signs in: loud, every time.
            self.result.error = str(exc)
            self.result.login_required = True
            log.error("poll failed account=%s login required: %s", name, exc)
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
        await self.state.run_finished(
            name,
            error=self.result.error,
            on_server=self.result.on_server,
            pending=self.result.pending,
            login_required=self.result.login_required,
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

    async def _run(self, retry_all: bool, retry_uids: frozenset[str]) -> None:
        name = self.account.name
        retried: set[str] = set()
        if retry_all or retry_uids:
            for record in await self.state.quarantined(name):
                if retry_all or record.uid in retry_uids:
                    await self.state.clear_quarantine(name, record.uid)
                    retried.add(record.uid)
        session = await Pop3Session.open(self.account)
        delay = session.capabilities.items.get("LOGIN-DELAY", ())
        if delay and delay[0].isdigit():
            self.result.login_delay = float(delay[0])
        try:
            await self._login(session)
            sizes, listing = await session.listing()
            uids = await message_uids(
                self.account, self.state, session, sizes, listing, self.result.notes
            )
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

    async def _transaction(
        self,
        session: Pop3Session,
        sizes: dict[int, int],
        uids: dict[int, str],
        retried: set[str],
    ) -> None:
        name = self.account.name
        plan = await make_plan(self.account, self.state, sizes, uids)
        self.result.skipped += plan.skipped
        if self.account.filters and plan.fetch:
            filtered = await apply_filters(self.account, self.state, session, plan, sizes, uids)
            self.result.skipped += filtered
        self._observer.planned(name, len(plan.fetch), sum(sizes.get(n, 0) for n in plan.fetch))
        self._spool.mkdir(parents=True, exist_ok=True)
        pipeline = DownloadPipeline(
            session, self._spool, BatchShape.for_sinks(self.handoff.takes_batches), self._stop
        )

        async def hand_over(items: list[Downloaded]) -> None:
            await self._hand_over(items, plan, uids, retried)

        async def retr_failed(number: int, reply: ErrReply) -> None:
            self.result.failed += 1
            await self.state.record_failure(name, uids[number], f"RETR: {reply.text}")
            log.warning("RETR failed account=%s number=%d: %s", name, number, reply.text)

        self.result.stopped = await pipeline.run(plan.fetch, sizes, hand_over, retr_failed)
        await session.finish_pending()
        # Only messages recorded as delivered are in plan.delete.
        if plan.delete:
            await session.delete(plan.delete)
        await session.quit()
        if plan.delete:
            # QUIT's +OK: the server committed the deletions.
            await self.state.record_deleted(name, [uids[n] for n in plan.delete])
            self.result.deleted = len(plan.delete)
        self.result.pending = pending(uids, await self.state.records(name))

    async def _hand_over(
        self, items: list[Downloaded], plan: Plan, uids: dict[int, str], retried: set[str]
    ) -> None:
        """One batch from the pipeline to the sinks (oversize ones to quarantine)."""
        name = self.account.name
        outcomes: list[tuple[Downloaded, Outcome]] = []
        normal: list[Downloaded] = []
        for item in items:
            self.result.octets += item.size
            if item.number in plan.oversize:
                message = self._fetched(item, uids)
                outcomes.append((item, await self.handoff.quarantine_oversize(message)))
            else:
                normal.append(item)
        if normal:
            delivered = await self.handoff.deliver([self._fetched(i, uids) for i in normal])
            outcomes += zip(normal, delivered, strict=True)
        for item, outcome in outcomes:
            self.result.count(outcome)
            if outcome == "delivered":
                if uids[item.number] in retried:
                    self.quarantine.remove(name, uids[item.number])
                if self.account.delete == "after_delivery":
                    plan.delete.append(item.number)
            self._observer.message_done(name, item.size, outcome)

    def _fetched(self, item: Downloaded, uids: dict[int, str]) -> FetchedMessage:
        return FetchedMessage(
            self.account.name, uids[item.number], item.size, item.digest, item.path, item.data
        )

    async def _retry_from_quarantine(self, uids: set[str]) -> None:
        """Re-offer quarantined messages that are no longer on the server, from the copy."""
        for uid in sorted(uids):
            path = self.quarantine.load(self.account.name, uid)
            if path is None:
                continue
            data_hash, size = await asyncio.to_thread(_hash_file, path)
            message = FetchedMessage(self.account.name, uid, size, data_hash, path)
            outcome = await self.handoff.deliver_one(message)
            self.result.count(outcome)
            if outcome == "delivered":
                self.quarantine.remove(self.account.name, uid)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
