"""What the HTTP sinks (webhook, Gmail) share when they retry: Retry-After and backoff."""

from __future__ import annotations

import email.utils
import random
from datetime import UTC, datetime

__all__ = ["backoff_delay", "retry_after_seconds"]


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or HTTP-date, RFC 9110 10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def backoff_delay(tries: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``tries``-th failed try: exponential from ``initial``,
    at most ``maximum``, drawn from the upper half so that many collectors do not
    retry in lockstep."""
    ceiling = min(maximum, initial * 2 ** (tries - 1))
    return random.uniform(ceiling / 2, ceiling)
