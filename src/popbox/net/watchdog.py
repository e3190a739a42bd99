"""The watchdog that cuts a session making no progress (slow-loris, a client that stops reading).

Progress is what the client does for us: a complete command before login (so a
byte-a-minute slow-loris does not reset it), any reply or output that left after it.
Time spent waiting on our own backends (hashing, the store) is not the client's
idleness; time spent waiting for the client to read our output is.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Watchdog", "Watched"]


class Watched(Protocol):
    """What a watchdog asks of the session it watches."""

    @property
    def gone(self) -> bool:
        """True once the connection is lost: nothing is left to watch."""
        ...

    def watch_timeout(self) -> float:
        """Seconds without progress allowed in the session's present state."""
        ...

    @property
    def waiting_on_us(self) -> bool:
        """True while a command waits on our side (a backend), not on the client."""
        ...

    def timed_out(self) -> None:
        """No progress for ``watch_timeout()`` seconds: end the session."""
        ...


class Watchdog:
    """One timer per session, re-armed lazily: progress only moves a timestamp.

    ``progress()`` is called on every write, so it must be cheap: the timer is not
    rescheduled then; when it fires early it sleeps again until the real deadline.
    The watchdog holds its session only while the timer runs, as a timer holding a
    callback would: an ended session is freed by its reference count, not left for
    the cycle collector.
    """

    # Thousands of idle sessions each hold one: no per-instance dict.
    __slots__ = ("_last_progress", "_loop", "_session", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._session: Watched | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_progress = 0.0

    def progress(self) -> None:
        """The client made progress (or our output reached it): the wait starts afresh."""
        self._last_progress = self._loop.time()

    def arm(self, session: Watched) -> None:
        """Count progress now and make sure the timer runs for ``session``."""
        self._last_progress = self._loop.time()
        if self._timer is None:
            self._session = session
            self._timer = self._loop.call_at(
                self._last_progress + session.watch_timeout(), self._fire
            )

    def rearm(self, session: Watched) -> None:
        """Arm with the timeout of the session's new state (after login), from now."""
        self.cancel()
        self.arm(session)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._session = None

    def _fire(self) -> None:
        session, self._session = self._session, None
        self._timer = None
        if session is None or session.gone:
            return
        deadline = self._last_progress + session.watch_timeout()
        waiting_on_us = session.waiting_on_us
        if waiting_on_us or deadline > self._loop.time():
            if waiting_on_us:
                deadline = self._loop.time() + session.watch_timeout()
            self._session = session
            self._timer = self._loop.call_at(deadline, self._fire)
            return
        session.timed_out()
