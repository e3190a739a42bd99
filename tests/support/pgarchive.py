"""PostgreSQL archives for tests, on a database of tests/support/postgres.py's cluster,
and the messages they keep (built with the stdlib email package, as a mail client
would send them)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

from popbox.archive.base import Archive
from popbox.archive.postgresql import PostgresArchive
from popbox.pgsql import PoolSettings
from support.postgres import PostgresServer

__all__ = ["mail", "postgres_archive", "postgres_factory"]


def postgres_archive(
    dsn: str,
    clock: Callable[[], float] | None = None,
    *,
    pool_max: int = 4,
    pool_timeout: float = 10.0,
) -> PostgresArchive:
    """An archive on ``dsn`` with a small pool (tests run many at once)."""
    pool = PoolSettings(dsn, min_size=1, max_size=pool_max, timeout=pool_timeout, connect_timeout=2)
    if clock is None:
        return PostgresArchive(pool)
    return PostgresArchive(pool, clock=clock)


def postgres_factory(server: PostgresServer) -> Callable[[Path], Awaitable[Archive]]:
    """The contract suite's factory (tests/archive/conftest.py): an archive on a new
    database of ``server`` for each directory, the same database for the same one."""
    databases: dict[Path, str] = {}

    async def make(path: Path) -> Archive:
        if path not in databases:
            databases[path] = await asyncio.to_thread(server.create_database)
        return postgres_archive(databases[path])

    return make


def mail(
    *,
    subject: str = "Hello",
    sender: str = "Alice Example <alice@example.com>",
    to: str = "bob@example.org",
    body: str = "Hi Bob.",
    date: float | None = None,
    attachments: Mapping[str, bytes] | None = None,
) -> bytes:
    """A message with these headers, a text body and the named attachments (each
    base64, so the same file is the same octets in every message that carries it)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    if date is not None:
        message["Date"] = format_datetime(datetime.fromtimestamp(date, UTC))
    message.set_content(body)
    for name, data in (attachments or {}).items():
        message.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return bytes(message)
