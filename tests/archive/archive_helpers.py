"""Messages and types the archive tests share (imported by name: tests/archive is on
the test path)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from popbox.archive.base import Archive

ArchiveFactory = Callable[[Path], Awaitable[Archive]]
"""``await factory(tmp_path)``: an archive of one backend (the same directory gives
the same archive again, for a reopen)."""


def message(
    subject: str = "hello",
    body: str = "some text",
    *,
    sender: str = "Alice <alice@example.com>",
    to: str = "bob@example.com",
    date: str | None = "Mon, 07 Dec 2026 10:00:00 +0000",
    extra: str = "",
) -> bytes:
    """A plain text message."""
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
    if date is not None:
        head += f"Date: {date}\r\n"
    return (
        head + extra + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n"
    ).encode()
