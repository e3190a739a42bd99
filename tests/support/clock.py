"""A clock for stores under test: real time, moved forward by days instead of slept."""

from __future__ import annotations

import time

from popbox.store.mailbox import DAY

__all__ = ["FakeClock"]


class FakeClock:
    """The time a store believes it is: the real time plus the days a test skipped.

    It runs as the real clock does (so names made in one test keep their order and
    file times and name times agree) and jumps forward when a test says so.
    """

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped

    def advance(self, *, days: float = 0, seconds: float = 0) -> None:
        self.skipped += days * DAY + seconds
