"""What every PostgreSQL backend of popbox shares: the connection pool, the
translation of driver errors into popbox's own, and the versioned schema.

The store (store.postgresql) and the user database (auth.postgresql) each keep a
pool of their own, built here from ``[postgresql]`` (config_scale.PostgresSettings)
and passed in as plain values, so this module knows nothing of the configuration.

A pool opens without waiting for the database: a node starts, and goes on serving,
while PostgreSQL is away; every request then waits at most ``pool_timeout`` for a
connection and fails with the temporary error its caller names (a client sees
``-ERR [SYS/TEMP]``, an MTA 451). Connections broken by a database restart are
checked and replaced when taken from the pool, so the node recovers by itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from popbox.errors import PopboxError

__all__ = [
    "PoolSettings",
    "Schema",
    "autocommit",
    "database_errors",
    "ensure_schema",
    "open_pool",
    "transaction",
]

log = logging.getLogger("popbox.pgsql")

# The table that records which version of each popbox schema a database holds.
_VERSIONS: Final = """
CREATE TABLE IF NOT EXISTS popbox_schema (
    name text PRIMARY KEY,
    version integer NOT NULL
)
"""
# One key for pg_advisory_xact_lock while a schema is created or upgraded: nodes that
# start together do it one after the other ("popbox" as an int8).
_SCHEMA_LOCK: Final = 0x706F70626F78


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The pool of one backend (config_scale.PostgresSettings has the reasons)."""

    dsn: str
    min_size: int = 1
    max_size: int = 10
    timeout: float = 10.0
    connect_timeout: int = 5
    application_name: str = "popbox"


async def open_pool(settings: PoolSettings, *, name: str) -> AsyncConnectionPool:
    """An open pool for ``settings``; does not wait for the database to answer."""
    checker = _Checker()
    pool: AsyncConnectionPool = AsyncConnectionPool(
        settings.dsn,
        min_size=min(settings.min_size, settings.max_size),
        max_size=settings.max_size,
        timeout=settings.timeout,
        name=name,
        open=False,
        check=checker,
        # A connection that cannot be made is not retried on a backoff in the
        # background: the next request that needs one tries again (and waits at
        # most ``timeout``), so a node finds the database as soon as it is back.
        reconnect_timeout=0,
        kwargs={
            "connect_timeout": settings.connect_timeout,
            "application_name": settings.application_name,
        },
    )
    checker.pool = pool
    await pool.open(wait=False)
    return pool


class _Checker:
    """Every connection is checked (an empty query) when it is handed out: after a
    database restart or failover every pooled connection is broken, and a request
    must not be the one that finds out. It costs a round trip per checkout.

    One broken connection means the others are too: the pool is drained at once
    (new connections are made in the background), because the pool's own way,
    checking the rest one by one with a growing pause between them, keeps the first
    request after a restart waiting longer than its timeout when the pool was full.
    """

    def __init__(self) -> None:
        self.pool: AsyncConnectionPool | None = None

    async def __call__(self, conn: psycopg.AsyncConnection[object]) -> None:
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            if self.pool is not None:
                log.info("pool %s: a connection was broken; replacing them all", self.pool.name)
                await self.pool.drain()
            raise


@contextlib.contextmanager
def database_errors(error: type[PopboxError], doing: str) -> Iterator[None]:
    """Translate a driver error met while ``doing`` into ``error`` (``raise from``).

    A pool that gave no connection in time, a database that is away or restarting,
    a connection lost mid-statement, a serialization failure: all become ``error``
    with a message that says what was being done; the cause stays in the chain.
    """
    try:
        yield
    except PoolTimeout as exc:
        raise error(f"{doing}: no database connection within the pool timeout") from exc
    except psycopg.Error as exc:
        raise error(f"{doing}: database error: {_describe(exc)}") from exc


def _describe(exc: psycopg.Error) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    sqlstate = exc.sqlstate
    return f"{first} (SQLSTATE {sqlstate})" if sqlstate else first


@dataclass(frozen=True, slots=True)
class Schema:
    """One backend's tables: ``steps[i]`` takes the schema from version i to i+1.

    A database at version v runs ``steps[v:]``; one newer than ``len(steps)`` was
    written by a newer popbox and is refused rather than guessed at.
    """

    name: str
    steps: Sequence[str]


async def ensure_schema(
    pool: AsyncConnectionPool, schema: Schema, *, error: type[PopboxError]
) -> None:
    """Create or upgrade ``schema`` in the database, once, whatever nodes race."""
    with database_errors(error, f"set up the {schema.name} tables"):
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            await conn.execute(_VERSIONS)
            cursor = await conn.execute(
                "SELECT version FROM popbox_schema WHERE name = %s", (schema.name,)
            )
            row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            if version > len(schema.steps):
                raise error(
                    f"the {schema.name} tables are at version {version}, newer than this "
                    f"popbox knows ({len(schema.steps)}): upgrade popbox"
                )
            for step in schema.steps[version:]:
                await conn.execute(step.encode())
            if version < len(schema.steps):
                await conn.execute(
                    "INSERT INTO popbox_schema (name, version) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version",
                    (schema.name, len(schema.steps)),
                )
                log.info(
                    "%s tables upgraded from version %d to %d",
                    schema.name,
                    version,
                    len(schema.steps),
                )


@contextlib.asynccontextmanager
async def transaction(
    pool: AsyncConnectionPool, error: type[PopboxError], doing: str
) -> AsyncIterator[psycopg.AsyncConnection]:
    """A connection from ``pool`` inside one transaction, driver errors translated."""
    with database_errors(error, doing):
        async with pool.connection() as conn, conn.transaction():
            yield conn


@contextlib.asynccontextmanager
async def autocommit(
    pool: AsyncConnectionPool, error: type[PopboxError], doing: str
) -> AsyncIterator[psycopg.AsyncConnection]:
    """A connection from ``pool`` whose every statement is its own transaction (no
    BEGIN and COMMIT round trips around work that is one statement), driver errors
    translated."""
    with database_errors(error, doing):
        async with pool.connection() as conn:
            await conn.set_autocommit(True)
            try:
                yield conn
            finally:
                if not conn.broken and not conn.closed:
                    await conn.set_autocommit(False)
