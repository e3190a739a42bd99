"""What every PostgreSQL backend shares (popbox.pgsql): the pool after a restart, the
versioned schema, and driver errors translated into popbox's own."""

from __future__ import annotations

import asyncio

import pytest

from popbox.errors import StoreError
from popbox.pgsql import PoolSettings, Schema, ensure_schema, open_pool, transaction
from support.postgres import PostgresServer


async def test_a_full_pool_serves_the_first_request_after_a_database_restart(
    private_postgres: PostgresServer,
) -> None:
    """Every pooled connection is broken by the restart; the first request must get a
    fresh one within its timeout, not wait while the pool checks the broken ones."""
    pool = await open_pool(PoolSettings(private_postgres.dsn(), max_size=8, timeout=5), name="t")
    try:

        async def busy() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.05)")

        await asyncio.gather(*(busy() for _ in range(16)))
        assert pool.get_stats()["pool_size"] == 8
        await asyncio.to_thread(private_postgres.restart)
        async with transaction(pool, StoreError, "ask after the restart") as conn:
            cursor = await conn.execute("SELECT 1")
            assert await cursor.fetchone() == (1,)
    finally:
        await pool.close()


async def test_a_database_away_is_the_callers_temporary_error(
    private_postgres: PostgresServer,
) -> None:
    pool = await open_pool(PoolSettings(private_postgres.dsn(), timeout=1), name="t")
    try:
        await asyncio.to_thread(private_postgres.stop)
        with pytest.raises(StoreError, match="look"):
            async with transaction(pool, StoreError, "look") as conn:
                await conn.execute("SELECT 1")
        await asyncio.to_thread(private_postgres.start)
        async with transaction(pool, StoreError, "look again") as conn:
            await conn.execute("SELECT 1")
    finally:
        await pool.close()


async def test_a_schema_is_made_once_upgraded_in_steps_and_a_newer_one_refused(
    postgres_dsn: str,
) -> None:
    pool = await open_pool(PoolSettings(postgres_dsn), name="t")
    try:
        first = Schema("things", ["CREATE TABLE things (a int)"])
        await asyncio.gather(*(ensure_schema(pool, first, error=StoreError) for _ in range(4)))
        second = Schema("things", [*first.steps, "ALTER TABLE things ADD b int"])
        await ensure_schema(pool, second, error=StoreError)
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO things (a, b) VALUES (1, 2)")
        with pytest.raises(StoreError, match="newer than this popbox knows"):
            await ensure_schema(pool, first, error=StoreError)
    finally:
        await pool.close()
