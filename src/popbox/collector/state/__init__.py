"""The collector's memory: which remote messages were seen, delivered, deleted, quarantined.

``CollectorState`` (state.base) is what a poll needs of it; ``StateDB`` (SQLite) is the
real one, built by the command line, and ``MemoryState`` the reference for tests.
"""

from popbox.collector.state.base import (
    AccountStatus,
    Attempt,
    CollectorState,
    Delivered,
    MessageRecord,
)
from popbox.collector.state.memory import MemoryState
from popbox.collector.state.sqlite import StateDB

__all__ = [
    "AccountStatus",
    "Attempt",
    "CollectorState",
    "Delivered",
    "MemoryState",
    "MessageRecord",
    "StateDB",
]
