"""Mailbox upkeep across every user, for the composition root: the sweep that removes
what the mailbox model says may go (``popbox serve``'s background sweeper and
``popbox expire``), and what ``popbox user show`` reports about one mailbox.

The users are those of the user database (the passwd file), each with the server's
``[mailbox]`` policy and their own ``popbox_*`` extra fields on top
(``MailboxSettings.policy_for``). The store does the work (``MailStore.sweep``, its
file work in threads); this module only walks the users, logs and sums up.
docs/mailbox-model.md describes the model for administrators.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from popbox.archive.base import Archive
from popbox.archive_upkeep import sweep_archive
from popbox.auth.base import UserDirectory, UserRecord
from popbox.config import Config, MailboxSettings
from popbox.config_mailbox import USER_POLICY_PREFIX
from popbox.errors import StoreError
from popbox.store.base import MailStore
from popbox.store.mailbox import DAY, DeviceReport, MailboxPolicy, SweepReport

__all__ = [
    "SWEEP_START_DELAY",
    "MailboxSweeper",
    "PolicyValue",
    "SweepSummary",
    "UserSweep",
    "describe_report",
    "device_holds",
    "known_devices",
    "load_users",
    "policy_values",
    "read_users",
    "stop_task",
    "sweep_all",
    "sweep_users",
]

log = logging.getLogger(__name__)

# The first sweep after `popbox serve` starts waits this long (or one sweep_interval,
# if shorter): start-up's first logins come first, yet a server that is restarted
# often still sweeps.
SWEEP_START_DELAY: Final = 10.0


def describe_report(report: SweepReport) -> str:
    """``2 removed, 1 moved, 0 hidden`` plus the busy folders, for logs and summaries."""
    text = f"{report.removed} removed, {report.moved} moved, {report.hidden} hidden"
    if report.busy:
        text += f"; busy (swept next time): {', '.join(report.busy)}"
    return text


def _did_something(report: SweepReport) -> bool:
    return bool(report.removed or report.moved or report.hidden or report.busy)


@dataclass(frozen=True, slots=True)
class UserSweep:
    """One user's part of a sweep: the store's report, or why it failed."""

    user: str
    report: SweepReport | None
    error: str | None = None

    @property
    def did_something(self) -> bool:
        return self.report is None or _did_something(self.report)


@dataclass(slots=True)
class SweepSummary:
    """What a sweep over several users did, user by user and in total."""

    users: list[UserSweep] = field(default_factory=list)
    total: SweepReport = field(default_factory=SweepReport)

    @property
    def failed(self) -> list[UserSweep]:
        return [item for item in self.users if item.error is not None]

    def describe(self) -> str:
        text = f"swept {len(self.users)} user{'' if len(self.users) == 1 else 's'}: "
        text += describe_report(self.total)
        if self.failed:
            text += f"; {len(self.failed)} failed: {', '.join(i.user for i in self.failed)}"
        return text


def load_users(config: Config) -> list[UserRecord]:
    """Every user of the passwd file, in file order (AuthError if it cannot be read)."""
    from popbox.auth.admin import list_users

    return list_users(config.auth.passwd_file)


async def sweep_users(
    settings: MailboxSettings,
    store: MailStore,
    records: Iterable[UserRecord],
    *,
    now: float | None = None,
) -> SweepSummary:
    """Sweep each user's mailbox with their policy; one user's StoreError is logged and
    the sweep goes on. ``now``: act as if at that time (seconds since the epoch)."""
    summary = SweepSummary()
    for record in records:
        policy = settings.policy_for(record.extra, user=record.name)
        try:
            report = await store.sweep(record.name, policy, now=now)
        except StoreError as exc:
            log.warning("sweep of %s failed: %s", record.name, exc)
            summary.users.append(UserSweep(record.name, None, str(exc)))
            continue
        summary.users.append(UserSweep(record.name, report))
        summary.total.add(report)
        if _did_something(report):
            log.info("sweep of %s: %s", record.name, describe_report(report))
    log.info("%s", summary.describe())
    return summary


async def sweep_all(
    config: Config,
    store: MailStore,
    *,
    now: float | None = None,
    users: UserDirectory | None = None,
) -> SweepSummary:
    """Sweep every user of the passwd file (read in a thread, off the event loop).

    ``users``: the server's own user database, read rather than the file, so that the
    mail locations the store reads from its memory are those of the users swept.
    """
    records = await read_users(config, users)
    return await sweep_users(config.mailbox, store, records, now=now)


async def read_users(config: Config, users: UserDirectory | None = None) -> list[UserRecord]:
    """Every user: of the server's own user database if given, else of the passwd
    file (read in a thread, off the event loop)."""
    if users is not None:
        return list(await asyncio.to_thread(users.users))
    return await asyncio.to_thread(load_users, config)


class MailboxSweeper:
    """``popbox serve``'s background sweep: every ``mailbox.sweep_interval`` seconds,
    the first one SWEEP_START_DELAY after start (or one interval, if shorter).

    Runs in one process only (the first worker when there are several): sweeps of
    one folder from two processes would only wait for each other's lock. A failed
    sweep is logged and tried again at the next interval; ``stop_task`` ends it.
    """

    def __init__(
        self,
        config: Config,
        store: MailStore,
        *,
        start_delay: float = SWEEP_START_DELAY,
        users: UserDirectory | None = None,
        archive: Archive | None = None,
    ) -> None:
        """``users``: the server's user database (see ``sweep_all``); ``archive``: also
        keep each user's archive (popbox.archive_upkeep) after their mailboxes."""
        self._config = config
        self._store = store
        self._users = users
        self._archive = archive
        self._start_delay = start_delay
        self.sweeps = 0
        """Sweeps finished so far (for tests and the log)."""

    async def run(self) -> None:
        interval = self._config.mailbox.sweep_interval
        log.info(
            "worker %d sweeps every mailbox every %g s (mailbox.sweep_interval)",
            os.getpid(),
            interval,
        )
        delay = min(self._start_delay, interval)
        while True:
            await asyncio.sleep(delay)
            delay = interval
            try:
                records = await read_users(self._config, self._users)
                await sweep_users(self._config.mailbox, self._store, records)
                if self._archive is not None:
                    await sweep_archive(self._config, self._archive, self._store, records)
            except Exception:
                # Whatever went wrong (an unreadable passwd file, a store bug), the
                # server keeps serving and the next interval tries again.
                log.exception("sweep of every mailbox failed; next try in %g s", interval)
            self.sweeps += 1

    def start(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.run(), name="mailbox-sweeper")


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end, quietly; a cancellation of the caller
    itself still propagates. A sweep cut short leaves each folder whole: the store
    sweeps a folder under its lock and crash-safely, and the next sweep finishes."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        log.exception("the mailbox sweeper failed")


# -- what `popbox user show` reports ----------------------------------------------------


def device_holds(device: DeviceReport, policy: MailboxPolicy, now: float) -> bool:
    """Whether ``device`` holds mail back now: its last normal-mode login is within
    ``active_days`` (the rule of store.devices.FolderState.holding_devices)."""
    return device.last_hold > 0 and now - device.last_hold <= policy.active_days * DAY


@dataclass(frozen=True, slots=True)
class PolicyValue:
    """One setting of a user's effective mailbox policy, and where it came from."""

    name: str
    value: str
    source: str
    """``server`` (the [mailbox] section), ``user`` (a popbox_* extra field), or
    ``server`` with a note when the user's field was malformed and ignored."""


_POLICY_FIELDS: Final = (
    "disposition",
    "retention_days",
    "keep_days",
    "trash_days",
    "active_days",
    "recent_days",
    "login_delay",
)


def _shown(name: str, policy: MailboxPolicy) -> str:
    value = getattr(policy, name)
    if name == "disposition":
        return str(policy.disposition.value)
    if name == "retention_days" and value is None:
        return "never"
    if name == "login_delay":
        return f"{value} s" if value else "none"
    return f"{value} day{'' if value == 1 else 's'}"


def _taken(name: str, text: str, policy: MailboxPolicy) -> bool:
    """Whether the user's field ``text`` is what made ``policy``'s value (it was not
    ignored as malformed by policy_for)."""
    value = getattr(policy, name)
    if name == "disposition":
        return text.lower() == policy.disposition.value
    if value is None:
        return text.lower() == "never"
    return text.isascii() and text.isdigit() and int(text) == value


def policy_values(
    settings: MailboxSettings, extra: Mapping[str, str], *, user: str = ""
) -> tuple[MailboxPolicy, list[PolicyValue]]:
    """The user's effective policy, and each value with where it came from."""
    policy = settings.policy_for(extra, user=user)
    values: list[PolicyValue] = []
    for name in _POLICY_FIELDS:
        key = USER_POLICY_PREFIX + name
        text = extra.get(key)
        if text is None:
            source = "server"
        elif _taken(name, text, policy):
            source = "user"
        else:
            source = f"server ({key}={text!r} ignored)"
        values.append(PolicyValue(name, _shown(name, policy), source))
    return policy, values


def known_devices(devices: Sequence[DeviceReport]) -> list[str]:
    """The distinct device names of a mailbox, sorted."""
    return sorted({device.device for device in devices})
