"""Moving one user's mailbox between two stores while the server runs (``popbox migrate``).

The order of the durable steps, and why a kill at any point is safe:

1. the user is marked "moving" in the target (store.moves): from now on the server
   (store.routed.MovingStore) serves nobody this mailbox ([IN-USE]) and defers
   deliveries (LMTP 451, the MTA retries), so nothing changes in the source;
2. deliveries that were already on their way into the source are waited for: a
   settling pause, and for a Maildir every fresh file in tmp/ gone (bounded);
3. every folder of the source is locked and read whole (store.image), the target
   made equal to it folder by folder (resumable: what a killed run copied is not
   copied again), target folders the source lacks removed; the source's usage is
   checked against what was copied, so a delivery that slipped in is not left
   behind (the copy runs again);
4. the user is marked "moved": the one step that switches the mailbox over; then
   the source's locks are released, and sessions open the target;
5. the source is removed (kept with ``keep_source``).

Killed before 4, the user stays "moving" and the source is complete: the next run
resumes. After 4 the target serves the user; the next run only finishes step 5. A
run that fails (a folder held by a session for too long, a store away) marks the
user back as not moved, and the source serves them again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from popbox.errors import MaildropInUse, PopboxError
from popbox.store.base import MailStore
from popbox.store.image import ImageSource, ImageStore
from popbox.store.mailbox import INBOX
from popbox.store.maildir import MaildirStore
from popbox.store.moves import MoveMarks, MoveState

__all__ = [
    "DELIVERY_SETTLE",
    "LOCK_WAIT",
    "MovableStore",
    "MoveOptions",
    "UserMove",
    "move_user",
]

# After the "moving" mark, how long a delivery that looked at the marks just before
# may still take to start writing: a delivery looks, then writes at once.
DELIVERY_SETTLE: Final = 2.0
# How long a folder's session may keep the move waiting before the move gives up
# (and the user is served from the source again): a POP3 session that downloads
# lasts seconds; one left idle ends at the 10-minute timeout, too long to block for.
LOCK_WAIT: Final = 60.0
# A file in a Maildir's tmp/ touched this recently is a delivery being written; an
# older one is a dead delivery (maildir(5) sweeps them after 36 hours).
IN_FLIGHT_AGE: Final = 120.0
# How often the waits above look again.
POLL_INTERVAL: Final = 0.2
# How many times the copy runs again when deliveries slipped into the source.
COPY_ROUNDS: Final = 3


class MovableStore(MailStore, ImageStore, Protocol):
    """A store a mailbox can be moved out of and into."""


@dataclass(frozen=True, slots=True)
class MoveOptions:
    dry_run: bool = False
    keep_source: bool = False
    settle: float = DELIVERY_SETTLE
    lock_wait: float = LOCK_WAIT


@dataclass(slots=True)
class UserMove:
    """What the move of one user did."""

    user: str
    folders: int = 0
    messages: int = 0
    octets: int = 0
    copied: int = 0
    """Messages copied by this run (the others were copied by an earlier one)."""
    already: bool = False
    """Moved by an earlier run: nothing copied."""
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "user": self.user,
            "folders": self.folders,
            "messages": self.messages,
            "octets": self.octets,
            "copied": self.copied,
            "already_moved": self.already,
            "error": self.error,
            "notes": self.notes,
        }


Progress = Callable[[str], None]


async def move_user(
    source: MovableStore,
    target: MovableStore,
    marks: MoveMarks,
    user: str,
    *,
    source_marks: MoveMarks | None = None,
    options: MoveOptions = MoveOptions(),
    progress: Progress = lambda line: None,
) -> UserMove:
    """Move ``user``'s mailbox from ``source`` to ``target`` (the module's steps);
    ``marks`` are the target's, ``source_marks`` the source's (cleared with it)."""
    report = UserMove(user)
    try:
        state = await marks.state(user)
        if state is MoveState.MOVED:
            report.already = True
            if not options.dry_run and not options.keep_source:
                await _remove_source(source, source_marks, user, report)
            return report
        if options.dry_run:
            folders = await source.folders(user)
            usage = await source.usage(user)
            report.folders = len(folders)
            report.messages, report.octets = usage.messages, usage.octets
            return report
        await marks.set(user, MoveState.MOVING)
    except PopboxError as exc:
        report.error = str(exc)
        return report
    try:
        await _settle(source, user, options)
        await _copy(source, target, marks, user, options, report, progress)
    except (PopboxError, OSError, TimeoutError) as exc:
        report.error = str(exc) or type(exc).__name__
        with contextlib.suppress(PopboxError):
            await marks.set(user, MoveState.NONE)  # the source is whole: it serves again
        return report
    if not options.keep_source:
        await _remove_source(source, source_marks, user, report)
    return report


async def _settle(source: MovableStore, user: str, options: MoveOptions) -> None:
    """Step 2: let deliveries that were on their way into the source arrive."""
    await asyncio.sleep(options.settle)
    if not isinstance(source, MaildirStore):
        return  # a database delivery is one transaction: done when it commits
    deadline = time.monotonic() + options.lock_wait
    folders = await source.folders(user)
    while True:
        busy = await asyncio.to_thread(_deliveries_in_flight, source, user, folders)
        if not busy:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"deliveries to {user} still being written: {', '.join(busy)}")
        await asyncio.sleep(POLL_INTERVAL)


def _deliveries_in_flight(store: MaildirStore, user: str, folders: list[str]) -> list[str]:
    """Fresh files in the tmp/ of each folder: deliveries being written."""
    busy: list[str] = []
    cutoff = time.time() - IN_FLIGHT_AGE
    for folder in folders:
        tmp = store.maildir(user, folder) / "tmp"
        try:
            with os.scandir(tmp) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.is_file() and entry.stat().st_mtime >= cutoff:
                            busy.append(f"{folder}/tmp/{entry.name}")
        except FileNotFoundError:
            continue
    return busy


async def _open(source: MovableStore, user: str, folder: str, wait: float) -> ImageSource:
    """The folder's image, waiting up to ``wait`` seconds for a session to end."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await source.open_image(user, folder)
        except MaildropInUse:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(POLL_INTERVAL)


async def _copy(
    source: MovableStore,
    target: MovableStore,
    marks: MoveMarks,
    user: str,
    options: MoveOptions,
    report: UserMove,
    progress: Progress,
) -> None:
    """Steps 3 and 4, under the locks of every source folder."""
    for _ in range(COPY_ROUNDS):
        folders = await source.folders(user)
        held: list[ImageSource] = []
        try:
            for folder in folders:
                held.append(await _open(source, user, folder, options.lock_wait))
            report.folders = len(held)
            report.messages = report.octets = 0
            for image_source in held:
                image = image_source.image
                done = await target.restore_image(image, image_source.read)
                report.copied += done.copied
                report.messages += len(image.messages)
                report.octets += sum(message.size for message in image.messages)
                progress(
                    f"{user}: {image.folder}: {len(image.messages)} messages "
                    f"({done.copied} copied, {done.skipped} there already, "
                    f"{done.removed} removed)"
                )
            for folder in await target.folders(user):
                if folder not in folders:
                    await target.remove_folder(user, folder)
            arrived = (await source.usage(user)).messages - report.messages
            if arrived > 0:
                progress(f"{user}: {arrived} messages arrived meanwhile; copying again")
                continue
            await marks.set(user, MoveState.MOVED)
            return
        finally:
            for image_source in held:
                await image_source.close()
    raise PopboxError(f"mail for {user} kept arriving during the move")


async def _remove_source(
    source: MovableStore, source_marks: MoveMarks | None, user: str, report: UserMove
) -> None:
    """Step 5; a failure leaves the user moved and is reported (a run again removes)."""
    try:
        if source_marks is not None:
            await source_marks.set(user, MoveState.NONE)
        folders = await source.folders(user)
        for folder in [f for f in folders if f != INBOX] + [INBOX]:
            await source.remove_folder(user, folder)
    except PopboxError as exc:
        report.error = f"moved, but the source is not removed ({exc}): run the move again"
