"""An in-memory collector state: the reference implementation of ``CollectorState``.

For tests, and as the model the SQLite state must match; nothing survives the process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from popbox.collector.state.base import (
    ERROR_TEXT_MAX,
    AccountStatus,
    Attempt,
    Delivered,
    MessageRecord,
)

__all__ = ["MemoryState"]


@dataclass(slots=True)
class _Message:
    size: int
    first_seen: float
    sha256: str | None = None
    delivered_at: float | None = None
    deleted_at: float | None = None
    quarantined: bool = False
    skipped: str | None = None
    attempts: int = 0
    last_error: str | None = None
    header_uid: str | None = None

    def record(self, uid: str) -> MessageRecord:
        return MessageRecord(
            uid=uid,
            size=self.size,
            sha256=self.sha256,
            delivered_at=self.delivered_at,
            deleted_at=self.deleted_at,
            quarantined=self.quarantined,
            skipped=self.skipped,
            attempts=self.attempts,
            last_error=self.last_error,
        )


@dataclass(slots=True)
class _Run:
    last_start: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0
    on_server: int = 0
    pending: int = 0
    login_required: bool = False


class MemoryState:
    """``CollectorState`` in dictionaries."""

    def __init__(self) -> None:
        self._messages: dict[tuple[str, str], _Message] = {}
        self._sinks: dict[tuple[str, str], set[str]] = {}
        self._runs: dict[str, _Run] = {}

    def close(self) -> None:
        return None

    def _known(self, account: str, uid: str, size: int, now: float) -> _Message:
        return self._messages.setdefault((account, uid), _Message(size=size, first_seen=now))

    # ---------------------------------------------------------------- reading

    async def records(self, account: str) -> dict[str, MessageRecord]:
        return {
            uid: message.record(uid)
            for (owner, uid), message in self._messages.items()
            if owner == account
        }

    async def quarantined(self, account: str) -> list[MessageRecord]:
        return [
            record
            for record in (await self.records(account)).values()
            if record.quarantined and record.delivered_at is None
        ]

    async def sinks_done(self, account: str, uids: Iterable[str]) -> dict[str, frozenset[str]]:
        return {
            uid: frozenset(sinks) for uid in set(uids) if (sinks := self._sinks.get((account, uid)))
        }

    async def status(self, accounts: Sequence[str]) -> list[AccountStatus]:
        result = []
        for account in accounts:
            run = self._runs.get(account, _Run())
            mine = [m for (owner, _), m in self._messages.items() if owner == account]
            result.append(
                AccountStatus(
                    account=account,
                    last_success=run.last_success,
                    last_error=run.last_error,
                    last_error_at=run.last_error_at,
                    failures=run.failures,
                    delivered=sum(m.delivered_at is not None for m in mine),
                    quarantined=sum(m.quarantined and m.delivered_at is None for m in mine),
                    pending=run.pending,
                    login_required=run.login_required,
                )
            )
        return result

    # ---------------------------------------------------------------- writing

    async def note_listing(self, account: str, entries: Sequence[tuple[str, int]]) -> None:
        now = time.time()
        for uid, size in entries:
            self._known(account, uid, size, now)

    async def start_attempts(
        self, account: str, entries: Sequence[tuple[str, int]]
    ) -> dict[str, Attempt]:
        now = time.time()
        for uid, size in entries:
            self._known(account, uid, size, now).attempts += 1
        done = await self.sinks_done(account, (uid for uid, _ in entries))
        return {
            uid: Attempt(self._messages[account, uid].attempts, done.get(uid, frozenset()))
            for uid, _ in entries
        }

    async def record_sinks(self, account: str, entries: Iterable[tuple[str, str]]) -> None:
        for uid, sink in entries:
            self._sinks.setdefault((account, uid), set()).add(sink)

    async def record_delivered(self, rows: Sequence[Delivered]) -> None:
        now = time.time()
        for row in rows:
            if row.sink:
                self._sinks.setdefault((row.account, row.uid), set()).add(row.sink)
            message = self._messages.get((row.account, row.uid))
            if message is not None:
                message.delivered_at = now
                message.sha256 = row.sha256
                message.header_uid = row.header_uid
                message.quarantined = False
                message.last_error = None

    async def adopt_header_uids(self, account: str, header_uids: Iterable[str]) -> int:
        now, adopted = time.time(), 0
        for header_uid in header_uids:
            earlier = next(
                (
                    message
                    for (owner, uid), message in self._messages.items()
                    if owner == account
                    and message.header_uid == header_uid
                    and message.delivered_at is not None
                    and uid != header_uid
                ),
                None,
            )
            if earlier is None or (account, header_uid) in self._messages:
                continue
            self._messages[account, header_uid] = _Message(
                size=earlier.size,
                first_seen=now,
                sha256=earlier.sha256,
                delivered_at=earlier.delivered_at,
                header_uid=header_uid,
            )
            adopted += 1
        return adopted

    async def record_failure(self, account: str, uid: str, error: str) -> None:
        if (message := self._messages.get((account, uid))) is not None:
            message.last_error = error[:ERROR_TEXT_MAX]

    async def record_quarantined(self, account: str, uid: str, reason: str, sha256: str) -> None:
        if (message := self._messages.get((account, uid))) is not None:
            message.quarantined = True
            message.last_error = reason[:ERROR_TEXT_MAX]
            message.sha256 = sha256

    async def clear_quarantine(self, account: str, uid: str) -> None:
        if (message := self._messages.get((account, uid))) is not None:
            message.quarantined = False
            message.attempts = 0

    async def record_skipped(self, account: str, uid: str, size: int, reason: str) -> None:
        self._known(account, uid, size, time.time()).skipped = reason

    async def record_deleted(self, account: str, uids: Iterable[str]) -> None:
        now = time.time()
        for uid in uids:
            if (message := self._messages.get((account, uid))) is not None:
                message.deleted_at = now

    async def run_started(self, account: str) -> None:
        self._runs.setdefault(account, _Run()).last_start = time.time()

    async def run_finished(
        self,
        account: str,
        *,
        error: str | None,
        on_server: int = 0,
        pending: int = 0,
        login_required: bool = False,
    ) -> None:
        run, now = self._runs.setdefault(account, _Run()), time.time()
        run.login_required = login_required and error is not None
        if error is None:
            run.last_success, run.failures = now, 0
            run.on_server, run.pending = on_server, pending
        else:
            run.last_error, run.last_error_at = error[:ERROR_TEXT_MAX], now
            run.failures += 1
