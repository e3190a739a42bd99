"""Reading a maildrop or a Maildir back in tests: what a POP3 client or a user would see."""

from __future__ import annotations

from pathlib import Path

from popbox.store import Maildrop, MailStore


async def read_all(maildrop: Maildrop, index: int) -> bytes:
    """The whole stored message, joined from its chunks."""
    return b"".join([chunk async for chunk in maildrop.read_message(index)])


async def stored_messages(store: MailStore, user: str) -> list[bytes]:
    """Every message in ``user``'s maildrop, in order (takes the lock and releases it)."""
    maildrop = await store.open_maildrop(user)
    try:
        return [await read_all(maildrop, index) for index in range(len(maildrop.messages))]
    finally:
        await maildrop.release()


def message_files(maildir: Path) -> list[Path]:
    """Every message file in new/ and cur/, sorted by name."""
    return sorted(
        (path for sub in ("new", "cur") for path in (maildir / sub).iterdir()),
        key=lambda path: path.name,
    )
