"""Removing messages from a locked Maildir folder: unlinked, or moved to Trash or Archive.

A commit (QUIT) and a sweep carry out the same RemovalPlan (store.devices) here, by
index position. A message is found where the index says, or where other software
renamed it since (flags, new/ and cur/): the file name up to its first ``:`` is the
key that survives renames. A move is one rename() from this folder's cur/ or new/ into
the target folder's cur/, under a fresh name that starts with the time of the move (so
the Trash counts its days from it), keeps the ``,S=``/``,W=`` sizes and the ``:2,``
flags: a message is in one folder or the other, never both and never neither. The
directories touched are fsynced before the index drops the entries, and the index is
written without a directory fsync of its own: should the old index come back after
a crash, the next login's reconcile drops the entries again.

Everything here is synchronous and raises plain OSError; callers run it in worker
threads and translate errors.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.fileio import fsync_dir
from popbox.store.devices import RemovalPlan
from popbox.store.index import IndexColumns, MaildirIndex, scan_messages
from popbox.store.index_file import IndexSignature, write_index
from popbox.store.maildir_sync import trusted_mtime
from popbox.store.maildir_uidls import drop_gone

__all__ = [
    "READ_FLAGS",
    "Destination",
    "FolderFiles",
    "Removal",
    "carry_out",
    "moved_name",
    "positions_of",
    "remove_messages",
]

log = logging.getLogger(__name__)

# Message files are opened without following a symlink swapped in after the scan.
READ_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


class FolderFiles:
    """The message files of one locked folder by index position, following renames.

    ``columns`` are the index version's, shared and never changed; positions found
    elsewhere since (renamed by a MUA) are remembered here, per session.
    """

    __slots__ = ("_key_cache", "_moved", "columns", "maildir")

    def __init__(self, maildir: Path, columns: IndexColumns) -> None:
        self.maildir = maildir
        self.columns = columns
        # Message keys by position, derived from the paths when first needed (a
        # rename search or a removal), not at every login.
        self._key_cache: tuple[str, ...] | None = None
        # Where a message was found after a rename since the snapshot, by position;
        # all others are where the index's paths say (shared, not copied).
        self._moved: dict[int, str] = {}

    def key(self, position: int) -> str:
        if self._key_cache is None:
            self._key_cache = tuple(path[4:].partition(":")[0] for path in self.columns.paths)
        return self._key_cache[position]

    def path(self, position: int) -> str:
        """``DIR/NAME`` of the message, relative to the Maildir."""
        moved = self._moved.get(position)
        if moved is not None:
            return moved
        return self.columns.paths[position]

    def find(self, position: int, found: dict[str, str] | None = None) -> str | None:
        """Where the message is now if it was renamed (None: gone); ``found`` is
        ``all_paths()`` if the caller listed the directories already."""
        if found is None:
            found = self.all_paths()
        path = found.get(self.key(position))
        if path is not None:
            self._moved[position] = path
        return path

    def open_moved(self, position: int) -> int | None:
        """Open a message renamed since the snapshot; None if it vanished."""
        path = self.find(position)
        if path is None:
            return None
        return os.open(self.maildir / path, READ_FLAGS)

    def all_paths(self) -> dict[str, str]:
        """``DIR/NAME`` of every message in new/ and cur/ by key."""
        paths: dict[str, str] = {}
        for directory in ("new", "cur"):
            names, _ = scan_messages(self.maildir / directory)
            paths.update((key, f"{directory}/{name}") for key, name in names.items())
        return paths


def moved_name(name: str, fresh: str) -> str:
    """The name a message called ``name`` takes in the target folder: ``fresh`` (a new
    unique base that starts with the time), this name's size fields and its flags."""
    key, colon, info = name.partition(":")
    fields = [part for part in key.split(",")[1:] if part[:2] in ("S=", "W=")]
    return ",".join([fresh, *fields]) + (colon + info if colon else ":2,")


@dataclass(frozen=True, slots=True)
class Destination:
    """Where moved messages go: the target folder's Maildir, and how to make the
    fresh base names they take there (unique, starting with the time)."""

    maildir: Path
    fresh_name: Callable[[], str]


@dataclass(slots=True)
class Removal:
    """What ``remove_messages`` did: the index it wrote and the first failure (the
    other messages were still attempted)."""

    signature: IndexSignature
    columns: IndexColumns
    failure: OSError | None


def remove_messages(
    files: FolderFiles,
    index: MaildirIndex,
    delete: Sequence[int],
    move: Sequence[int] = (),
    destination: Destination | None = None,
) -> Removal:
    """Unlink the messages at positions ``delete``, rename those at ``move`` into
    ``destination``'s cur/, make both durable, drop them from ``index`` and write it.
    Raises OSError if the index cannot be written; a failed unlink or rename is
    reported in ``failure``."""
    if move and destination is None:
        raise ValueError("a move needs a destination")
    maildir = files.maildir
    # cur/ as the index last saw it: if it changed since (a move into this folder
    # from another, a MUA), the mtime after our own changes proves nothing.
    foreign = os.stat(maildir / "cur").st_mtime_ns != index.cur_mtime
    failure: OSError | None = None
    relocated: dict[str, str] | None = None
    # The directories an unlink or rename (or an attempt) touched: only they need an
    # fsync. The login moved new/ mail to cur/, so new/ is usually not one.
    touched: set[str] = set()
    moving = set(move)
    removed: list[str] = []
    for position in sorted({*delete, *moving}):
        to = destination if position in moving else None
        path = files.path(position)
        try:
            touched.add(path[:3])
            _remove(maildir, path, to)
        except FileNotFoundError:
            if relocated is None:
                relocated = files.all_paths()
            found = files.find(position, relocated)
            if found is not None:  # renamed since the snapshot; else already gone
                try:
                    touched.add(found[:3])
                    _remove(maildir, found, to)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failure = failure or exc
                    continue
        except OSError as exc:
            failure = failure or exc
            continue
        index.entries.pop(files.key(position), None)
        removed.append(files.key(position))
    if moving and destination is not None:
        fsync_dir(destination.maildir / "cur")  # the new names first: never in neither
    for directory in sorted(touched):
        fsync_dir(maildir / directory)
    # After a failed unlink nobody knows what cur/ holds, nor after a change by
    # others: make the next login rescan it rather than trust its mtime.
    cur_mtime = os.stat(maildir / "cur").st_mtime_ns
    index.cur_mtime = 0 if failure or foreign else trusted_mtime(cur_mtime)
    written = index.columns()
    # The removals are durable now. This index only drops their entries: should the
    # old one come back after a crash, the next login's reconcile drops them again,
    # with every other UIDL as it was. So its rename needs no directory fsync of its
    # own before QUIT's +OK.
    signature = write_index(maildir, index, written, durable=False)
    if index.uidl_journal is not None:
        try:
            # The removed messages' kept UIDLs go with them (after the removals are
            # durable); a line left behind by a failure here is harmless.
            drop_gone(maildir, index, set(removed))
        except OSError as exc:
            log.warning("folder %s: kept UIDLs not compacted: %s", maildir, exc)
    return Removal(signature, written, failure)


def _remove(maildir: Path, path: str, destination: Destination | None) -> None:
    """Unlink ``DIR/NAME``, or rename it into the destination's cur/ (one rename():
    the message is in one folder or the other at every moment)."""
    if destination is None:
        os.unlink(maildir / path)
    else:
        name = moved_name(path[4:], destination.fresh_name())
        os.rename(maildir / path, destination.maildir / "cur" / name)


def carry_out(
    files: FolderFiles,
    index: MaildirIndex,
    plan: RemovalPlan,
    destination: Callable[[str], Destination],
) -> Removal | None:
    """``remove_messages`` for a plan by UID (None if nothing of it is in the index);
    ``destination`` gives the plan's target folder, made if missing, when it moves."""
    delete = positions_of(files.columns.uids, plan.delete)
    move = positions_of(files.columns.uids, plan.move)
    if not delete and not move:
        return None
    to = destination(plan.target) if move and plan.target is not None else None
    return remove_messages(files, index, delete, move, to)


def positions_of(uids: Sequence[int], wanted: Iterable[int]) -> list[int]:
    """The positions of ``wanted`` in the sorted ``uids`` (those not there left out)."""
    positions = []
    for uid in wanted:
        at = bisect.bisect_left(uids, uid)
        if at < len(uids) and uids[at] == uid:
            positions.append(at)
    return positions
