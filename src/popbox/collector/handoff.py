"""The hand-off: fetched messages to every sink of an account, each step recorded, or quarantined.

Steps 1 to 3 of the exactly-once order in ``popbox.collector.poll`` happen here: the
attempt is counted before any sink runs; each sink's confirmation is recorded once the
sink returned (so it is durable there); the message is recorded as delivered, with the
last sink's confirmation, only once every sink confirmed. A sink that already has a
message is skipped, so one sink's failure never duplicates into the others.

A sink whose OAuth login is dead (OAuthLoginRequired), or that takes nothing at all
for now (SinkUnavailable: its login refused, a permission missing, its server down),
fails the whole run, not the message: no message is at fault, so none is counted as
failed or quarantined, and every one waits on the server for a later run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final, Literal

from popbox.collector.base import BatchSink, FetchedMessage, Sink
from popbox.collector.config import AccountSettings
from popbox.collector.plan import header_uid_of
from popbox.collector.quarantine import Quarantine
from popbox.collector.state import CollectorState, Delivered
from popbox.errors import OAuthLoginRequired, PermanentSinkError, SinkError, SinkUnavailable
from popbox.fileio import write_all

__all__ = ["Handoff", "Outcome"]

log = logging.getLogger("popbox.collector")

Outcome = Literal["delivered", "quarantined", "failed"]
"""A message's fate in one run; "failed" is temporary (offered again next run)."""

# A sink handed in without settings of its own (a test's) waits this long.
DEFAULT_SINK_TIMEOUT: Final = 60.0


class Handoff:
    """Delivers one account's fetched messages to its sinks and records each step."""

    def __init__(
        self,
        account: AccountSettings,
        state: CollectorState,
        sinks: Sequence[Sink],
        quarantine: Quarantine,
    ) -> None:
        self._account = account
        self._name = account.name
        self._state = state
        self._sinks = list(sinks)
        self._timeouts = [sink.timeout for sink in account.sinks]
        self._quarantine = quarantine

    @property
    def takes_batches(self) -> bool:
        """Every sink takes batches: many messages are made durable together, so the
        pipeline should hand over as many at once as it has."""
        return bool(self._sinks) and all(isinstance(s, BatchSink) for s in self._sinks)

    async def deliver(self, messages: Sequence[FetchedMessage]) -> list[Outcome]:
        """Offer the messages to every sink that lacks them; one outcome each, in order.

        With batch sinks one commit counts the attempts, each sink takes the messages it
        lacks as one batch, and one commit records them all delivered; a batch a sink
        fails is offered again message by message (its attempt already counted), so
        one bad message is retried or quarantined alone. Otherwise each message goes
        to each sink alone (``deliver_one``).
        """
        if not self.takes_batches:
            return [await self.deliver_one(message) for message in messages]
        attempts = await self._state.start_attempts(
            self._name, [(m.uidl, m.size) for m in messages]
        )
        messages = [replace(m, attempt=attempts[m.uidl].count) for m in messages]
        done = {uid: attempt.sinks_done for uid, attempt in attempts.items()}
        try:
            last = await self._to_sinks(messages, done, alone=False)
        except Exception as exc:
            _raise_unavailable(exc)
            if not isinstance(exc, SinkError):
                log.exception("sink raised unexpectedly account=%s batch", self._name)
            log.info(
                "batch failed account=%s messages=%d: %s; one by one",
                self._name,
                len(messages),
                exc,
            )
            # One by one, sinks (and the quarantine) read files: write out what is held.
            await asyncio.to_thread(_spill, messages)
            try:
                outcomes: list[Outcome] = []
                for message in messages:
                    now_done = await self._state.sinks_done(self._name, [message.uidl])
                    count = attempts[message.uidl].count
                    outcomes.append(await self._offer_alone(message, count, now_done))
                return outcomes
            finally:
                _unlink_spilled(messages)
        await self._record_delivered(messages, last)
        log.debug("batch delivered account=%s messages=%d", self._name, len(messages))
        return ["delivered"] * len(messages)

    async def deliver_one(self, message: FetchedMessage) -> Outcome:
        """Count an attempt and offer the message to each sink that lacks it, alone:
        "delivered", "quarantined" (refused for good, or out of attempts) or "failed"."""
        attempts = await self._state.start_attempts(self._name, [(message.uidl, message.size)])
        attempt = attempts[message.uidl]
        message = replace(message, attempt=attempt.count)
        return await self._offer_alone(message, attempt.count, {message.uidl: attempt.sinks_done})

    async def quarantine_oversize(self, message: FetchedMessage) -> Outcome:
        """Set aside a message over the account's size limit; its attempt is counted."""
        await self._state.start_attempts(self._name, [(message.uidl, message.size)])
        return await self._set_aside(message, f"over max_message_size ({message.size} octets)")

    # ---------------------------------------------------------------- the steps

    async def _offer_alone(
        self, message: FetchedMessage, attempts: int, done: Mapping[str, frozenset[str]]
    ) -> Outcome:
        uid = message.uidl
        try:
            last = await self._to_sinks([message], done, alone=True)
        except Exception as exc:  # a sink bug must not stop the queue: count it
            _raise_unavailable(exc)
            if isinstance(exc, PermanentSinkError):
                return await self._set_aside(message, str(exc))
            if not isinstance(exc, SinkError):
                log.exception("sink raised unexpectedly account=%s uid=%s", self._name, uid)
            if attempts >= self._account.max_attempts:
                return await self._set_aside(message, f"gave up after {attempts} attempts: {exc}")
            await self._state.record_failure(self._name, uid, str(exc))
            log.warning(
                "delivery failed account=%s uid=%s attempt=%d: %s", self._name, uid, attempts, exc
            )
            return "failed"
        await self._record_delivered([message], last)
        return "delivered"

    async def _to_sinks(
        self,
        messages: Sequence[FetchedMessage],
        done: Mapping[str, frozenset[str]],
        *,
        alone: bool,
    ) -> dict[str, str]:
        """Give each sink the messages it lacks and record its confirmations, all but
        the last sink's: uid -> that sink, for the "delivered" commit. A sink's failure
        is raised once the confirmations before it are recorded."""
        last: dict[str, str] = {}
        try:
            for index, sink in enumerate(self._sinks):
                lacking = [m for m in messages if sink.name not in done.get(m.uidl, ())]
                if not lacking:
                    continue
                timeout = (
                    self._timeouts[index] if index < len(self._timeouts) else DEFAULT_SINK_TIMEOUT
                )
                await _give(sink, lacking, timeout, alone=alone)
                earlier = [(m.uidl, last[m.uidl]) for m in lacking if m.uidl in last]
                if earlier:
                    await self._state.record_sinks(self._name, earlier)
                # The last confirmation is recorded with "delivered", in one commit.
                last.update((m.uidl, sink.name) for m in lacking)
        except Exception:
            if last:
                await self._state.record_sinks(self._name, list(last.items()))
            raise
        return last

    async def _record_delivered(
        self, messages: Sequence[FetchedMessage], last: Mapping[str, str]
    ) -> None:
        rows = await asyncio.to_thread(
            lambda: [
                Delivered(self._name, m.uidl, m.sha256, last.get(m.uidl), header_uid_of(m))
                for m in messages
            ]
        )
        await self._state.record_delivered(rows)
        for message in messages:
            log.info("delivered account=%s uid=%s size=%d", self._name, message.uidl, message.size)

    async def _set_aside(self, message: FetchedMessage, reason: str) -> Outcome:
        path = await asyncio.to_thread(self._save_in_quarantine, message, reason)
        await self._state.record_quarantined(self._name, message.uidl, reason, message.sha256)
        log.warning(
            "quarantined account=%s uid=%s path=%s reason=%s",
            self._name,
            message.uidl,
            path,
            reason,
        )
        return "quarantined"

    def _save_in_quarantine(self, message: FetchedMessage, reason: str) -> Path:
        # The quarantine copies a file; a body held in memory is written out for it.
        spilled = _spill([message])
        try:
            return self._quarantine.save(
                account=self._name,
                uid=message.uidl,
                source=message.path,
                sha256=message.sha256,
                size=message.size,
                reason=reason,
            )
        finally:
            _unlink_spilled(spilled)


def _raise_unavailable(exc: BaseException) -> None:
    """Raise the OAuthLoginRequired or SinkUnavailable behind ``exc`` (itself, or what
    a sink wrapped in a SinkError): the run fails, no message does."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OAuthLoginRequired | SinkUnavailable):
            raise cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


async def _give(
    sink: Sink, lacking: list[FetchedMessage], per_message: float, *, alone: bool
) -> None:
    if alone:
        [message] = lacking
        try:
            await asyncio.wait_for(sink.deliver(message), per_message)
        except TimeoutError as exc:
            raise SinkError(f"{sink.name}: no answer within {per_message:g}s") from exc
        return
    assert isinstance(sink, BatchSink)
    try:
        # The per-message timeout, for each message of the batch.
        await asyncio.wait_for(sink.deliver_batch(lacking), per_message * len(lacking))
    except TimeoutError as exc:
        raise SinkError(f"{sink.name}: batch not taken in time") from exc


def _spill(messages: Iterable[FetchedMessage]) -> list[FetchedMessage]:
    """Write bodies held in memory to their spool path, for code that reads files;
    return the messages written (``_unlink_spilled`` removes them again)."""
    written = []
    for message in messages:
        if message.data is not None and not message.path.exists():
            fd = os.open(message.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, message.data)
            finally:
                os.close(fd)
            written.append(message)
    return written


def _unlink_spilled(messages: Iterable[FetchedMessage]) -> None:
    for message in messages:
        if message.data is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(message.path)
