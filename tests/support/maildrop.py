"""Helpers shared by the storage tests (a module of its own so tests can import it)."""

from __future__ import annotations

from pathlib import Path

from popbox.store import Maildrop


async def read_all(maildrop: Maildrop, index: int) -> bytes:
    """The whole stored message, joined from its chunks."""
    return b"".join([chunk async for chunk in maildrop.read_message(index)])


def message_files(maildir: Path) -> list[Path]:
    """Every message file in new/ and cur/, sorted by name."""
    return sorted(
        (path for sub in ("new", "cur") for path in (maildir / sub).iterdir()),
        key=lambda path: path.name,
    )
