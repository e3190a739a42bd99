"""Reading a maildrop or a Maildir back in tests: what a POP3 client or a user would see."""

from __future__ import annotations

from pathlib import Path

from popbox.store import Maildrop, MailStore
from popbox.store.mailbox import INBOX, MailboxView


async def read_all(maildrop: Maildrop, index: int) -> bytes:
    """The whole stored message, joined from its chunks."""
    return b"".join([chunk async for chunk in maildrop.read_message(index)])


async def stored_messages(store: MailStore, user: str, folder: str = INBOX) -> list[bytes]:
    """Every message in a folder of ``user``'s mailbox, in order (takes the lock and
    releases it; the default device's view)."""
    view = MailboxView(folder)
    maildrop = await (
        store.open_maildrop(user) if folder == INBOX else store.open_maildrop(user, view)
    )
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
