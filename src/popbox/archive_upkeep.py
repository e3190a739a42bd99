"""Archive upkeep across every user, beside the mailbox sweep: what the ``archive``
disposition moved into a mailbox's Archive folder is taken into the archive, and each
user's archive retention is applied (``popbox serve``'s sweeper, ``popbox archive
expire``).

The Archive folder is read through the store as popbox's own look (INSPECT: no login
noted, nothing deleted), and each message is remembered in the archive by its origin
``Archive/<uidl>``, so a folder of thousands is not read again at every sweep: only
what came since. A folder held by a POP3 session is skipped until the next sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from popbox.archive.base import Archive, ArchiveSource
from popbox.auth.base import UserRecord
from popbox.config import Config
from popbox.errors import ArchiveError, MaildropInUse, NoSuchFolder, StoreError
from popbox.store.base import MailStore
from popbox.store.mailbox import ARCHIVE, MailboxView

__all__ = ["ArchiveSweep", "keep_archive_folder", "sweep_archive"]

log = logging.getLogger("popbox.archive")

# The Archive folder as popbox itself looks at it: every stored message, nothing noted.
_ARCHIVE_FOLDER_VIEW = MailboxView(folder=ARCHIVE, inspect=True)


@dataclass(slots=True)
class ArchiveSweep:
    """What one sweep of every user's archive did."""

    kept: int = 0
    """Messages taken in from Archive folders."""
    expired: int = 0
    """Entries removed by retention."""
    failed: int = 0
    """Users whose archive upkeep failed (logged; tried again next time)."""

    def describe(self) -> str:
        return (
            f"archive sweep: {self.kept} kept from Archive folders, {self.expired} expired"
            + (f", {self.failed} users failed" if self.failed else "")
        )


def _origin(uidl: str) -> str:
    return f"{ARCHIVE}/{uidl}"


async def keep_archive_folder(archive: Archive, store: MailStore, user: str) -> int:
    """Take the messages of ``user``'s Archive folder not yet taken into the archive;
    return how many were. A missing folder is nothing to do; a folder in use raises
    MaildropInUse (the caller tries again later)."""
    try:
        maildrop = await store.open_maildrop(user, _ARCHIVE_FOLDER_VIEW)
    except NoSuchFolder:
        return 0
    kept = 0
    try:
        origins = {_origin(info.uidl): index for index, info in enumerate(maildrop.messages)}
        if not origins:
            return 0
        known = await archive.known_origins(user, list(origins))
        for origin, index in origins.items():
            if origin in known:
                continue
            data = b"".join([chunk async for chunk in maildrop.read_message(index)])
            await archive.add(
                user, data, source=ArchiveSource.DISPOSITION, folder=ARCHIVE, origin=origin
            )
            kept += 1
    finally:
        await maildrop.release()
    return kept


async def sweep_archive(
    config: Config,
    archive: Archive,
    store: MailStore,
    records: Iterable[UserRecord],
    *,
    now: float | None = None,
) -> ArchiveSweep:
    """Archive upkeep for each user by their archive policy; one user's failure is
    logged and the sweep goes on."""
    moment = time.time() if now is None else now
    result = ArchiveSweep()
    for record in records:
        policy = config.archive.policy_for(record.name, record.extra)
        try:
            if policy.keeps(ArchiveSource.DISPOSITION):
                result.kept += await keep_archive_folder(archive, store, record.name)
            if policy.retention_days is not None:
                result.expired += await archive.expire(
                    record.name, policy.retention_days, moment
                )
        except MaildropInUse:
            log.info("archive sweep of %s: Archive folder in use, next time", record.name)
        except (ArchiveError, StoreError, OSError) as exc:
            log.warning("archive sweep of %s failed: %s", record.name, exc)
            result.failed += 1
    if result.kept or result.expired or result.failed:
        log.info("%s", result.describe())
    return result
