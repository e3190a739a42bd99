"""Carrying out an import plan on popbox's Maildir store, resumably and idempotently.

Every folder is planned whole before anything is written (popbox.migrate.plan); the
mapping of rewritten UIDLs is written next, durably; then each folder is applied:

- in place (adopt): the source Maildir *is* the user's folder in popbox's store, and
  ``MaildirStore.adopt_uidls`` records every kept or rewritten UIDL under the folder's
  lock in one step, with the old server's order. It is idempotent: a second run
  changes nothing.
- by copy: each message not yet in the folder is delivered with its UIDL, in the old
  server's order. The store's UIDLs are the record of what is done: a message whose
  planned UIDL the folder already holds is skipped, so an import killed at any
  point and run again stores each message exactly once (a delivery is durable when
  ``deliver`` returns, or it never happened).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from popbox.errors import NoSuchFolder
from popbox.fileio import fsync_dir, write_all
from popbox.migrate.plan import Decision, FolderPlan, UserPlan
from popbox.store.mailbox import MailboxView

if TYPE_CHECKING:
    from popbox.store.maildir import MaildirStore

__all__ = [
    "MAPPING_NAME",
    "FolderResult",
    "adopt_folder",
    "copy_folder",
    "existing_uidls",
    "write_mapping",
]

# The file in the user's Maildir (beside cur/, new/, tmp/) that lists rewritten UIDLs.
MAPPING_NAME: Final = "popbox-import-uidl-map"


@dataclass(slots=True)
class FolderResult:
    folder: str
    stored: int = 0
    """Messages copied in, or given their UIDL in place, by this run."""
    already: int = 0
    """Messages a former run had already done."""
    details: list[str] = field(default_factory=list)


async def existing_uidls(store: MaildirStore, user: str, folder: str) -> set[str]:
    """The UIDLs ``folder`` already holds (empty for a folder not made yet)."""
    try:
        maildrop = await store.open_maildrop(user, MailboxView(folder=folder, inspect=True))
    except NoSuchFolder:
        return set()
    try:
        return {message.uidl for message in maildrop.messages}
    finally:
        await maildrop.release()


def mapping_lines(plan: UserPlan) -> list[str]:
    lines = ["# folder\tkey\told UIDL\tnew UIDL\treason (written by popbox import)\n"]
    for folder in plan.folders:
        for message in folder.rewritten:
            old = (message.source.old_uidl or "").encode("unicode_escape").decode("ascii")
            lines.append(
                f"{folder.folder}\t{message.source.key}\t{old}\t{message.uidl}\t{message.reason}\n"
            )
    return lines


def write_mapping(plan: UserPlan, maildir: Path) -> Path | None:
    """Write the old -> new list of rewritten UIDLs into ``maildir``, durably; None if
    nothing was rewritten. A rerun writes the same file (plans are deterministic)."""
    lines = mapping_lines(plan)
    if len(lines) == 1:
        return None
    maildir.mkdir(parents=True, exist_ok=True)
    target = maildir / MAPPING_NAME
    temporary = maildir / f".{MAPPING_NAME}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, "".join(lines).encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    fsync_dir(maildir)
    return target


async def adopt_folder(store: MaildirStore, user: str, plan: FolderPlan) -> FolderResult:
    """Give the messages of a folder used in place the UIDLs of the plan."""
    result = FolderResult(plan.folder)
    uidls = {
        message.source.key: message.uidl
        for message in plan.messages
        if message.uidl is not None and message.decision in (Decision.KEEP, Decision.REWRITE)
    }
    order = [
        message.source.key for message in plan.messages if message.decision is not Decision.SKIP
    ]
    report = await store.adopt_uidls(user, uidls, folder=plan.folder, order=order)
    result.stored = len(report.adopted)
    result.already = len(report.already)
    for key in report.invalid:
        result.details.append(
            f"{key}: the store refused {uidls[key]!r} (popbox's own form or served for another "
            "message): it serves a UIDL of its own, and clients fetch this message once more"
        )
    for key in report.missing:
        result.details.append(f"{key}: gone from the Maildir before the UIDLs were recorded")
    return result


async def copy_folder(
    store: MaildirStore, user: str, plan: FolderPlan, present: Iterable[str]
) -> FolderResult:
    """Deliver every planned message the folder does not hold yet, in plan order."""
    result = FolderResult(plan.folder)
    held = set(present)
    for message in plan.messages:
        if message.decision is Decision.SKIP or message.uidl is None:
            continue
        if message.uidl in held:
            result.already += 1
            continue
        path = message.source.path
        assert path is not None  # Maildir and mbox sources plan files; live ones deliver bytes
        with path.open("rb") as source:
            await store.deliver_file(user, source, folder=plan.folder, uidl=message.uidl)
        held.add(message.uidl)
        result.stored += 1
    return result
