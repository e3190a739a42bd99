"""PostgreSQL mail stores for tests: on a database of tests/support/postgres.py's
cluster, with a small pool, node "test" and the test's clock."""

from __future__ import annotations

from collections.abc import Callable

from popbox.pgsql import PoolSettings
from popbox.store.postgresql import PostgresStore, PostgresStoreSettings

__all__ = ["postgres_store"]


def postgres_store(
    dsn: str,
    clock: Callable[[], float] | None = None,
    *,
    node: str = "test",
    pool_max: int = 4,
    pool_timeout: float = 10.0,
    **settings: float,
) -> PostgresStore:
    """A store on ``dsn``; ``settings``: lease_seconds, duplicate_window."""
    pool = PoolSettings(dsn, min_size=1, max_size=pool_max, timeout=pool_timeout, connect_timeout=2)
    store_settings = PostgresStoreSettings(pool, node, **settings)
    if clock is None:
        return PostgresStore(store_settings)
    return PostgresStore(store_settings, clock=clock)
