"""The log line's timestamp, cached per second, reads exactly as logging's own."""

from __future__ import annotations

import logging

from popbox.cli import _Formatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def test_cached_timestamp_matches_loggings_own() -> None:
    ours, stock = _Formatter(FORMAT), logging.Formatter(FORMAT)
    # Several records within one second, then the next second and back: the cache
    # must follow the clock, never reuse a stale second.
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_699_999_999.25):
        record = logging.LogRecord("popbox.pop3", logging.INFO, __file__, 1, "m", (), None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        assert ours.format(record) == stock.format(record)
