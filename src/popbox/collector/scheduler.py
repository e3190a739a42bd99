"""Running polls: one pass over the accounts, or the ``--daemon`` loop.

Accounts are polled concurrently under ``max_concurrent_accounts``. In daemon mode each
account has its own loop: its interval with jitter after a success, and after a
failure an exponential backoff (capped by ``max_backoff``) shaped by the server's
response code: [LOGIN-DELAY] waits at least the server's announced delay, [IN-USE]
(another client holds the maildrop) retries sooner, [SYS/TEMP] and everything else
back off. A stop request (SIGTERM) lets the message in hand finish, then ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Final

from popbox.collector.base import LocalDeliveryFactory
from popbox.collector.config import AccountSettings, FetchSettings
from popbox.collector.poll import Poller, PollObserver, PollResult
from popbox.collector.state import CollectorState
from popbox.proto.replies import CODE_IN_USE, CODE_LOGIN_DELAY

__all__ = ["next_delay", "run_daemon", "run_once"]

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
    stop: asyncio.Event | None = None,
    observer: PollObserver | None = None,
    local_delivery: LocalDeliveryFactory | None = None,
) -> list[PollResult]:
    """Poll each account once, concurrently under the global cap."""
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
            return await make(account).run(retry_quarantined=retry_quarantined)

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


async def run_daemon(
    settings: FetchSettings,
    accounts: Sequence[AccountSettings],
    db: CollectorState,
    *,
    stop: asyncio.Event,
    observer: PollObserver | None = None,
    local_delivery: LocalDeliveryFactory | None = None,
    rng: random.Random | None = None,
) -> None:
    """Poll every account on its own schedule until ``stop`` is set."""
    rng = rng or random.Random()
    limit = asyncio.Semaphore(settings.max_concurrent_accounts)

    def make(account: AccountSettings) -> Poller:
        return Poller(
            account, settings, db, local_delivery=local_delivery, stop=stop, observer=observer
        )

    async def wait(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def loop(account: AccountSettings) -> None:
        # Spread the first polls so accounts sharing a server do not arrive together.
        await wait(rng.uniform(0, min(account.interval * settings.jitter, FIRST_POLL_SPREAD)))
        failures = 0
        while not stop.is_set():
            async with limit:
                if stop.is_set():
                    return
                try:
                    result = await make(account).run()
                except Exception as exc:  # a bug in one account's poll: back off, go on
                    log.error("poll crashed account=%s", account.name, exc_info=exc)
                    result = PollResult(account.name, error=f"internal error: {exc!r}")
            failures = 0 if result.ok else failures + 1
            delay = next_delay(account, result, failures, settings, rng)
            log.info(
                "next poll account=%s in=%.0fs failures=%d code=%s",
                account.name,
                delay,
                failures,
                result.error_code or "-",
            )
            await wait(delay)

    await asyncio.gather(*(loop(account) for account in accounts))
