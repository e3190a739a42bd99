"""Running polls: one pass over the accounts, or the ``--daemon`` loop.

Accounts are polled concurrently under ``max_concurrent_accounts``. In daemon mode each
account has its own loop: its interval with jitter after a success, and after a
failure an exponential backoff (capped by ``max_backoff``) shaped by the server's
response code: [LOGIN-DELAY] waits at least the server's announced delay, [IN-USE]
(another client holds the maildrop) retries sooner, [SYS/TEMP] and everything else
back off; an OAuth login that needs signing in again waits ``max_backoff``. A stop
request (SIGTERM) lets the message in hand finish, then ends. A reload (SIGHUP)
re-reads the config and swaps only the accounts that changed (``run_daemon``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from popbox.collector.base import LocalDeliveryFactory
from popbox.collector.config import AccountSettings, FetchSettings
from popbox.collector.poll import Poller, PollObserver, PollResult
from popbox.collector.state import CollectorState
from popbox.errors import PopboxError
from popbox.proto.replies import CODE_IN_USE, CODE_LOGIN_DELAY

__all__ = ["ConfigLoader", "next_delay", "run_daemon", "run_once"]

log = logging.getLogger("popbox.collector")

# The first retry after a failure; doubles per consecutive failure up to max_backoff.
FIRST_RETRY: Final = 30.0
# [IN-USE] means another client is in the maildrop right now; it usually leaves
# within a minute, so the first retry comes sooner than for other failures.
IN_USE_RETRY: Final = 15.0
# RFC 2449 LOGIN-DELAY: without an announced value, wait a quarter of an hour.
DEFAULT_LOGIN_DELAY: Final = 900.0

# The first polls of a daemon start spread over a few seconds, not a whole interval:
# a freshly started daemon should show that it works.
FIRST_POLL_SPREAD: Final = 5.0

def next_delay(
    account: AccountSettings,
    result: PollResult,
    failures: int,
    settings: FetchSettings,
    rng: random.Random,
) -> float:
    """Seconds until the account's next poll."""
    if result.ok:
        base = account.interval
    elif result.login_required:
        # Retrying cannot help until someone signs in again (a reload polls at once).
        base = max(settings.max_backoff, account.interval)
    else:
        first = IN_USE_RETRY if result.error_code == CODE_IN_USE else FIRST_RETRY
        base = min(settings.max_backoff, first * 2 ** max(failures - 1, 0))
        if result.error_code == CODE_LOGIN_DELAY:
            base = max(base, result.login_delay or DEFAULT_LOGIN_DELAY, account.interval)
    spread = base * settings.jitter
    return max(1.0, base + rng.uniform(-spread, spread))


async def run_once(
    settings: FetchSettings,
    accounts: Sequence[AccountSettings],
    db: CollectorState,
    *,
    retry_quarantined: bool = False,
    retry_uids: Mapping[str, Collection[str]] | None = None,
    stop: asyncio.Event | None = None,
    observer: PollObserver | None = None,
    local_delivery: LocalDeliveryFactory | None = None,
) -> list[PollResult]:
    """Poll each account once, concurrently under the global cap; ``retry_uids``
    (account -> UIDLs) offers those quarantined messages again."""
    retry_uids = retry_uids or {}
    stop = stop or asyncio.Event()
    limit = asyncio.Semaphore(settings.max_concurrent_accounts)

    def make(account: AccountSettings) -> Poller:
        return Poller(
            account, settings, db, local_delivery=local_delivery, stop=stop, observer=observer
        )

    async def one(account: AccountSettings) -> PollResult:
        async with limit:
            if stop.is_set():
                result = PollResult(account.name, stopped=True)
                result.error = "stopped before the poll began"
                return result
            return await make(account).run(
                retry_quarantined=retry_quarantined, retry_uids=retry_uids.get(account.name, ())
            )

    outcomes = await asyncio.gather(*(one(account) for account in accounts), return_exceptions=True)
    results: list[PollResult] = []
    for account, outcome in zip(accounts, outcomes, strict=True):
        if isinstance(outcome, PollResult):
            results.append(outcome)
            continue
        if not isinstance(outcome, Exception):
            raise outcome  # KeyboardInterrupt, cancellation: not an account's failure
        # A bug must not hide the other accounts' results; it fails this account.
        log.error("poll crashed account=%s", account.name, exc_info=outcome)
        results.append(PollResult(account.name, error=f"internal error: {outcome!r}"))
    return results


# What a reload reads: the settings and the accounts to poll (the command line's
# re-reading of its config file, validated; raises PopboxError or OSError when bad).
ConfigLoader = Callable[[], tuple[FetchSettings, list[AccountSettings]]]


@dataclass(eq=False, slots=True)
class _AccountLoop:
    """One account's polling loop in the daemon."""

    account: AccountSettings
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    """Ends the wait between polls: a stop, a retirement or a wake-up."""
    retired: bool = False
    """Finish the poll in hand, then end (the account was changed or removed)."""
    login_required: bool = False
    task: asyncio.Task[None] | None = None


class _Daemon:
    """Every account on its own schedule; a reload swaps the accounts that changed."""

    def __init__(
        self,
        settings: FetchSettings,
        db: CollectorState,
        *,
        stop: asyncio.Event,
        observer: PollObserver | None,
        local_delivery: LocalDeliveryFactory | None,
        rng: random.Random,
    ) -> None:
        self._settings = settings
        self._db = db
        self._stop = stop
        self._observer = observer
        self._local_delivery = local_delivery
        self._rng = rng
        self._limit = asyncio.Semaphore(settings.max_concurrent_accounts)
        self._loops: dict[str, _AccountLoop] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Loops of removed accounts finishing their poll in hand, by account name.
        self._leaving: dict[str, asyncio.Task[None]] = {}

    def start(self, account: AccountSettings, after: asyncio.Task[None] | None = None) -> None:
        """Start polling ``account``, once the loop it replaces (``after``) ended."""
        leaving = self._leaving.pop(account.name, None)
        if after is None and leaving is not None and not leaving.done():
            after = leaving  # removed, then added again while its last poll ran
        entry = _AccountLoop(account)
        entry.task = asyncio.create_task(self._loop(entry, after), name=f"poll {account.name}")
        self._tasks.add(entry.task)
        entry.task.add_done_callback(self._tasks.discard)
        self._loops[account.name] = entry

    def _retire(self, entry: _AccountLoop) -> None:
        entry.retired = True
        entry.interrupt.set()

    async def finish(self) -> None:
        """After a stop: let every loop end its poll in hand."""
        for entry in self._loops.values():
            entry.interrupt.set()
        while self._tasks:
            await asyncio.gather(*self._tasks)

    def reload(self, load: ConfigLoader) -> None:
        """Apply a re-read config; a bad one is refused and the running one kept."""
        try:
            settings, accounts = load()
        except (PopboxError, OSError) as exc:
            log.error("config reload refused, the running config stays: %s", exc)
            return
        if settings.state_db_path != self._settings.state_db_path:
            log.error("config reload refused: a new state_db needs a restart of the daemon")
            return
        wanted = {account.name: account for account in accounts}
        added = [name for name in wanted if name not in self._loops]
        removed = [name for name in self._loops if name not in wanted]
        changed = [
            name
            for name, account in wanted.items()
            if name in self._loops and self._loops[name].account != account
        ]
        unchanged = [name for name in wanted if name in self._loops and name not in changed]
        if settings.max_concurrent_accounts != self._settings.max_concurrent_accounts:
            # Polls under way finish under the old cap; the next ones take the new one.
            self._limit = asyncio.Semaphore(settings.max_concurrent_accounts)
        self._settings = settings
        for name in removed:
            gone = self._loops.pop(name)
            self._retire(gone)
            if gone.task is not None:
                self._leaving[name] = gone.task
        for name in changed:
            old = self._loops[name]
            self._retire(old)
            self.start(wanted[name], after=old.task)
        for name in added:
            self.start(wanted[name])
        for name in unchanged:
            if self._loops[name].login_required:
                # Someone may have signed in: worth a try now, not after max_backoff.
                self._loops[name].interrupt.set()
        log.info(
            "config reloaded added=%d changed=%d removed=%d unchanged=%d",
            len(added),
            len(changed),
            len(removed),
            len(unchanged),
        )

    async def _wait(self, entry: _AccountLoop, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(entry.interrupt.wait(), seconds)
        if not entry.retired and not self._stop.is_set():
            entry.interrupt.clear()

    def _ended(self, entry: _AccountLoop) -> bool:
        return entry.retired or self._stop.is_set()

    async def _loop(self, entry: _AccountLoop, after: asyncio.Task[None] | None) -> None:
        account = entry.account
        if after is not None:
            # Never two polls of one account at once: the old loop ends its poll first.
            await after
        # Spread the first polls so accounts sharing a server do not arrive together.
        settings = self._settings
        await self._wait(
            entry, self._rng.uniform(0, min(account.interval * settings.jitter, FIRST_POLL_SPREAD))
        )
        failures = 0
        while not self._ended(entry):
            limit = self._limit
            async with limit:
                if self._ended(entry):
                    return
                poller = Poller(
                    account,
                    self._settings,
                    self._db,
                    local_delivery=self._local_delivery,
                    stop=self._stop,
                    observer=self._observer,
                )
                try:
                    result = await poller.run()
                except Exception as exc:  # a bug in one account's poll: back off, go on
                    log.error("poll crashed account=%s", account.name, exc_info=exc)
                    result = PollResult(account.name, error=f"internal error: {exc!r}")
            entry.login_required = result.login_required
            failures = 0 if result.ok else failures + 1
            delay = next_delay(account, result, failures, self._settings, self._rng)
            log.info(
                "next poll account=%s in=%.0fs failures=%d code=%s",
                account.name,
                delay,
                failures,
                "LOGIN-REQUIRED" if result.login_required else result.error_code or "-",
            )
            await self._wait(entry, delay)


async def run_daemon(
    settings: FetchSettings,
    accounts: Sequence[AccountSettings],
    db: CollectorState,
    *,
    stop: asyncio.Event,
    observer: PollObserver | None = None,
    local_delivery: LocalDeliveryFactory | None = None,
    rng: random.Random | None = None,
    reload: asyncio.Event | None = None,
    load: ConfigLoader | None = None,
) -> None:
    """Poll every account on its own schedule until ``stop`` is set. Each time
    ``reload`` is set (SIGHUP), ``load`` re-reads the config: unchanged accounts keep
    their loop, schedule and backoff; changed ones finish the poll in hand and start
    again with the new settings; removed ones stop after the poll in hand; new ones
    start. A config ``load`` refuses is logged and the running one kept."""
    daemon = _Daemon(
        settings,
        db,
        stop=stop,
        observer=observer,
        local_delivery=local_delivery,
        rng=rng or random.Random(),
    )
    for account in accounts:
        daemon.start(account)
    while not stop.is_set():
        waits = [asyncio.create_task(stop.wait())]
        if reload is not None:
            waits.append(asyncio.create_task(reload.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if reload is not None and reload.is_set() and not stop.is_set():
            reload.clear()
            if load is not None:
                daemon.reload(load)
    await daemon.finish()
