"""Which folder a delivery goes to: ``alice+invoices@`` or ``popbox deliver -m invoices``.

The folder is asked for by whoever sends the mail (the address's detail), so it is
taken only where that is safe, and INBOX is where anything else goes; a delivery
never bounces for its folder (``mailbox.folder_delivery``)::

    "create"    the folder, made on first delivery (up to MAX_DELIVERY_FOLDERS folders)
    "existing"  the folder if the user has it
    "inbox"     always INBOX

A name that can be no folder (store.mailbox.check_folder_name) goes to INBOX, and so
does Trash or Archive in any case: mail must not land where it is about to be
deleted, or where nobody looks for new mail. A name that matches an existing folder
but for case goes to that folder (LMTP lowercases local parts by default, and
``alice+Invoices@`` should not make a second folder).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final, Literal

from popbox.errors import InvalidMailboxName
from popbox.store.mailbox import ARCHIVE, INBOX, TRASH, check_folder_name, is_inbox

__all__ = ["MAX_DELIVERY_FOLDERS", "FolderDelivery", "delivery_folder", "wants_folder"]

log = logging.getLogger("popbox.delivery")

# Each folder is a directory of four (Maildir++) on disk and a line in every listing: a
# sender who makes up a new detail per message must not make thousands of them.
# Dovecot's lda_mailbox_autocreate has no bound; a hundred holds any real filing scheme.
MAX_DELIVERY_FOLDERS: Final = 100
# Folders that delivery never fills, compared case-insensitively.
_NOT_FOR_DELIVERY: Final = frozenset({TRASH.casefold(), ARCHIVE.casefold()})

FolderDelivery = Literal["create", "existing", "inbox"]


def wants_folder(requested: str, mode: FolderDelivery) -> str | None:
    """The folder ``requested`` may name, before the user's folders are known; None
    when the answer is INBOX whatever folders the user has."""
    if not requested or mode == "inbox":
        return None
    try:
        folder = check_folder_name(requested)
    except InvalidMailboxName:
        log.info("folder %r cannot be a folder name: delivered to INBOX", requested[:40])
        return None
    if is_inbox(folder) or folder.casefold() in _NOT_FOR_DELIVERY:
        return None
    return folder


def delivery_folder(folder: str, mode: FolderDelivery, existing: Sequence[str]) -> str:
    """Where mail asked for ``folder`` (as ``wants_folder`` returned it) goes, given the
    user's folders now."""
    for name in existing:
        if name.casefold() == folder.casefold():
            return name
    if mode == "existing":
        return INBOX
    if len(existing) >= MAX_DELIVERY_FOLDERS:
        log.warning(
            "folder %s not created: the user has %d folders (at most %d by delivery); "
            "delivered to INBOX", folder, len(existing), MAX_DELIVERY_FOLDERS,
        )
        return INBOX
    return folder
