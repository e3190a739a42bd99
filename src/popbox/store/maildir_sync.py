"""Bringing a Maildir's index in line with its directories, and counting its usage.

A login calls ``reconcile`` with the maildrop lock held: it drops what other
software deleted, follows renames by key, gives UIDs to new messages (sized from W=
or by reading them once), and moves new/ mail to cur/. The index records cur/'s
mtime, so while cur/ is unchanged a login lists only new/, and a quota check at
delivery time reads only the index header (``header_is_current``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from popbox.store.base import Usage
from popbox.store.index import (
    IndexHeader,
    MaildirIndex,
    message_key,
    messages_by_key,
    regular_names,
    scan_messages,
    size_fields,
    sorted_by_arrival,
    wire_field,
    wire_size_of_file,
)

__all__ = [
    "count_usage",
    "estimate_size",
    "header_is_current",
    "move_new_to_cur",
    "nothing_to_reconcile",
    "reconcile",
    "trusted_mtime",
]

log = logging.getLogger(__name__)

# The info part Maildir readers give a message they move from new/ to cur/.
SEEN_INFO: Final = ":2,"
# On filesystems that stamp whole seconds (ext3, HFS+; FAT in 2 s steps) a directory
# mtime is only trusted as "nothing changed" once it is this old: a change in the
# same step as our own would otherwise hide behind an unchanged mtime.
MTIME_SETTLE_NS: Final = 2_000_000_000
_NS_PER_SECOND: Final = 1_000_000_000
# Threads that read unindexed messages without W= to size them. The reads are I/O
# when the page cache is cold (a disk serves several at once) and the threads drop
# the GIL in open()/read(); more than a few only adds switching on small machines.
SIZE_READ_THREADS: Final = 4
# Fewer files than this are read by the login's own thread: starting a pool costs
# more than it saves on a handful of deliveries.
SIZE_READ_PARALLEL_MIN: Final = 256
# A cold login lists new/ in a second thread when cur/ is at least this big (about
# 3,000 names on ext4): below it a thread costs more than the overlap saves.
PARALLEL_LIST_MIN_BYTES: Final = 256 * 1024
# A message key: a listing line up to its first ':' (the info part).
_KEY: Final = re.compile(r"^[^\n:]*", re.M)


def trusted_mtime(mtime_ns: int) -> int:
    """``mtime_ns`` if an unchanged mtime later can prove "cur/ unchanged", else 0.

    Sub-second stamps (ext4, xfs, btrfs, tmpfs) move with the kernel's clock tick, so
    only a foreign change in the same tick as our own, while we hold the lock, could
    hide; it is found at the next change of cur/. Trusting them at once keeps quota
    checks after a commit from recounting a big maildrop. Whole-second stamps must
    settle first.
    """
    if mtime_ns % _NS_PER_SECOND or time.time_ns() - mtime_ns >= MTIME_SETTLE_NS:
        return mtime_ns
    return 0


def estimate_size(directory: Path, name: str) -> int:
    """Wire size of an unindexed file without reading it: W=, else S=, else st_size.

    W= misses the final CRLF of a message without one, and S= and st_size undercount
    bare-LF line ends; good enough for a quota check, and the exact size is computed
    when a session indexes the message.
    """
    stored, wire = size_fields(name)
    if wire is not None:
        return wire
    if stored is not None:
        return stored
    try:
        return (directory / name).stat().st_size
    except FileNotFoundError:
        return 0


def reconcile(user: str, maildir: Path, index: MaildirIndex, order: Sequence[str] = ()) -> bool:
    """Update ``index`` to what cur/ and new/ hold now; True if it changed.

    Messages new to the index get UIDs oldest first, except those whose keys are in
    ``order``: they come first, in that order (the numbering of the server popbox
    replaces, for a folder's first index). Called with the maildrop lock held;
    raises OSError for the caller to translate.
    """
    if not len(index) and not index.cur_mtime:
        # A first or rebuilt index (a cold login): everything is new to it. (An empty
        # index that trusts cur/'s mtime is a poll of an empty maildrop: below.)
        return _reconcile_fresh(user, maildir, index, order)
    new_names, new_duplicates = scan_messages(maildir / "new")
    warn_duplicates(user, "new", new_duplicates)
    cur_mtime = os.stat(maildir / "cur").st_mtime_ns
    # index.entries is only touched when new/ or cur/ has news: an index read from
    # its file builds its 100,000 entries on first use, and a login that finds
    # nothing new (the warm login of docs/performance.md) needs none of them.
    cur_names: dict[str, str] | None = None
    if not (index.cur_mtime and index.cur_mtime == cur_mtime and not index.written_in_new):
        # cur/ changed since the index was written (or we cannot tell): rescan it.
        cur_names, duplicates = scan_messages(maildir / "cur")
        warn_duplicates(user, "cur", duplicates)
    return _reconcile_names(user, maildir, index, cur_mtime, new_names, cur_names, order)


def nothing_to_reconcile(
    maildir: Path,
    index: MaildirIndex,
    max_new_bytes: int,
    *,
    cur: Path | None = None,
    new: Path | None = None,
) -> bool:
    """Whether ``reconcile`` would leave ``index`` as it is, proven cheaply or not at all.

    True only for an index that trusts cur/'s mtime, which is unchanged, and a new/
    of at most ``max_new_bytes`` that holds no message; False means "cannot tell
    cheaply", not "changed". A directory that once held a lot stays big when empty.
    ``cur`` and ``new`` are the Maildir's subdirectories when the caller has them.
    """
    if not index.cur_mtime or index.written_in_new:
        return False
    if index.cur_mtime != os.stat(cur or maildir / "cur").st_mtime_ns:
        return False
    new = new or maildir / "new"
    if os.stat(new).st_size > max_new_bytes:
        return False
    names, duplicates = scan_messages(new)
    return not names and not duplicates


def _reconcile_names(
    user: str,
    maildir: Path,
    index: MaildirIndex,
    cur_mtime: int,
    new_names: dict[str, str],
    cur_names: dict[str, str] | None,
    order: Sequence[str] = (),
) -> bool:
    """``reconcile`` once new/ (and cur/, None if unchanged) are listed by key."""
    changed = False
    unindexed: dict[str, str] = {}  # key -> DIR/NAME of messages new to the index
    if cur_names is not None:
        entries = index.entries
        for key in list(entries):
            entry = entries[key]
            if key in cur_names:
                path = f"cur/{cur_names[key]}"
            elif key in new_names:
                path = f"new/{new_names[key]}"
            else:  # deleted by other software
                del entries[key]
                changed = True
                continue
            if entry.path != path:
                entry.path = path
                changed = True
        unindexed.update(
            (key, f"cur/{name}") for key, name in cur_names.items() if key not in entries
        )
    in_new: list[str] = []
    for key, name in new_names.items():
        known = index.entries.get(key)
        if known is None:
            if key in unindexed:  # the same key in cur/ wins
                warn_duplicates(user, "new", [name])
            else:
                unindexed[key] = f"new/{name}"
                in_new.append(key)
        elif known.path.startswith("cur/"):
            warn_duplicates(user, "new", [name])
        else:
            in_new.append(key)
            if known.path != f"new/{name}":
                known.path = f"new/{name}"
                changed = True
    if unindexed:
        changed |= _index_unseen(maildir, index, unindexed, order)
    if move_new_to_cur(user, maildir, index, in_new):
        changed = True
        cur_mtime = os.stat(maildir / "cur").st_mtime_ns
    # Without moves of ours the first stat stands: a foreign change since then only
    # makes the next login rescan cur/ (the recorded mtime is older), never skip it.
    trusted = trusted_mtime(cur_mtime)
    if trusted != index.cur_mtime:
        index.cur_mtime = trusted
        changed = True
    return changed


def _reconcile_fresh(
    user: str, maildir: Path, index: MaildirIndex, order: Sequence[str] = ()
) -> bool:
    """``reconcile`` for an index that holds nothing yet: list, sort and size in bulk.

    A cold login on 100,000 messages spent most of its CPU in per-name Python work
    (docs/performance.md). When every name is simple (no dotfiles or duplicate keys,
    the same width of leading delivery time, a valid W=), C-level passes over the
    names joined into one string find the sizes in the same order and with the same
    values as the general path; anything else takes the general path on the same
    listings. new/ is listed by a second thread while this one lists cur/: with the
    page cache cold both are disk reads of several MB, and the listings drop the GIL.
    """
    cur_stat = os.stat(maildir / "cur")
    cur_mtime = cur_stat.st_mtime_ns
    # Listed after the stat: a change to cur/ from here on makes the next login
    # rescan it (the recorded mtime is older), so nothing moved meanwhile is missed
    # for more than this login.
    if cur_stat.st_size >= PARALLEL_LIST_MIN_BYTES:
        with ThreadPoolExecutor(1, thread_name_prefix="popbox-list") as pool:
            listing_new = pool.submit(regular_names, maildir / "new")
            cur_list = regular_names(maildir / "cur")
            new_list = listing_new.result()
    else:
        new_list = regular_names(maildir / "new")
        cur_list = regular_names(maildir / "cur")
    simple = None if order else _simple_listing(cur_list, new_list)
    if simple is None:
        new_names, new_duplicates = messages_by_key(new_list)
        warn_duplicates(user, "new", new_duplicates)
        cur_names, duplicates = messages_by_key(cur_list)
        warn_duplicates(user, "cur", duplicates)
        return _reconcile_names(user, maildir, index, cur_mtime, new_names, cur_names, order)
    paths, sizes = simple
    index.assign_all(paths, sizes)
    if move_new_to_cur(user, maildir, index, [message_key(name) for name in new_list]):
        cur_mtime = os.stat(maildir / "cur").st_mtime_ns
    index.cur_mtime = trusted_mtime(cur_mtime)
    return True


def _simple_listing(cur: list[str], new: list[str]) -> tuple[list[str], list[int]] | None:
    """DIR/NAME paths in arrival order and their W= sizes, or None if not that simple.

    What the general path (messages_by_key, sorted_by_arrival, wire_field) would
    make of these names, when it can be found in C-level passes: no dotfile, no
    line break, no key twice, every name starting with the same number of digits
    (then string order is arrival order) and carrying a valid W= in its key.
    """
    names = cur + new
    if not names:
        return [], []
    names.sort()
    blob = "\n".join(names)
    width = len(names[0]) - len(names[0].lstrip("0123456789"))
    if (
        not width
        or "\r" in blob
        or blob.count("\n") != len(names) - 1
        or blob.startswith(".")
        or "\n." in blob
        or len(set(_KEY.findall(blob))) != len(names)
    ):
        return None
    # Greedy up to the key's end, then back to the last valid W= in the key: the one
    # size_fields() keeps. One match per line at most, so all lines matched if the
    # counts agree.
    found = re.findall(
        rf"^[0-9]{{{width}}}(?![0-9])[^\n:]*,W=([0-9]+)(?=[,:\n])", blob + "\n", re.M
    )
    if len(found) != len(names):
        return None
    sizes = list(map(int, found))
    if not new:
        return list(map("cur/".__add__, names)), sizes
    in_new = set(new)
    return [("new/" if name in in_new else "cur/") + name for name in names], sizes


def _index_unseen(
    maildir: Path, index: MaildirIndex, unindexed: dict[str, str], order: Sequence[str] = ()
) -> bool:
    """Give UIDs to messages new to the index (key -> DIR/NAME), oldest first, those
    named in ``order`` before the others and in that order.

    True if any got one (all of them may have vanished meanwhile).
    """
    ordered = sorted_by_arrival(unindexed)
    if order:
        first = [(key, unindexed[key]) for key in dict.fromkeys(order) if key in unindexed]
        named = {key for key, _ in first}
        ordered = first + [item for item in ordered if item[0] not in named]
    # W= is trusted without opening the file (a cold 100,000-message login would
    # otherwise read a block of each). It is exact for everything popbox writes; a
    # foreign unterminated message keeps Dovecot's figure, 2 below RETR's.
    sizes = [wire_field(path[4:]) for _, path in ordered]
    unsized = [i for i, size in enumerate(sizes) if size is None]
    if unsized:
        for i, size in zip(
            unsized, _read_sizes(maildir, [ordered[i][1] for i in unsized]), strict=True
        ):
            sizes[i] = size
    # A None size: removed by other software while we looked.
    kept = [
        (path, size) for (_, path), size in zip(ordered, sizes, strict=True) if size is not None
    ]
    index.assign_all([path for path, _ in kept], [size for _, size in kept])
    return bool(kept)


def _read_sizes(maildir: Path, paths: list[str]) -> list[int | None]:
    """The wire size of each DIR/NAME by reading it (None if it vanished).

    Many files are read by a few threads at once: with the page cache cold the
    disk serves several requests in parallel, and the threads drop the GIL in
    open() and read(), which are most of the work.
    """
    # Names relative to open directories, as in move_new_to_cur: no Path per file.
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    dir_fds = {directory: os.open(maildir / directory, flags) for directory in ("cur", "new")}

    def size_slice(part: list[str]) -> list[int | None]:
        sizes: list[int | None] = []
        for path in part:
            try:
                sizes.append(wire_size_of_file(path[4:], dir_fds[path[:3]]))
            except FileNotFoundError:
                sizes.append(None)
        return sizes

    try:
        if len(paths) < SIZE_READ_PARALLEL_MIN:
            return size_slice(paths)
        step = -(-len(paths) // (SIZE_READ_THREADS * 4))  # a few slices per thread
        parts = [paths[i : i + step] for i in range(0, len(paths), step)]
        with ThreadPoolExecutor(SIZE_READ_THREADS, thread_name_prefix="popbox-size") as pool:
            return [size for sizes in pool.map(size_slice, parts) for size in sizes]
    finally:
        for dir_fd in dir_fds.values():
            os.close(dir_fd)


def move_new_to_cur(user: str, maildir: Path, index: MaildirIndex, keys: list[str]) -> bool:
    """Rename indexed new/ messages into cur/ as Maildir readers do; True if any moved.

    The key stays the same, so UIDLs do too; a move the next crash undoes is found
    again in new/ by its key (and cur/'s mtime, back to its old value, no longer
    matches the index, so the next login rescans). That is why the moves get no fsync
    of their own: the index write that follows makes them durable where the
    filesystem orders metadata, and nothing is lost where it does not. Leaving new/
    to fresh arrivals keeps usage() cheap.
    """
    if not keys:
        return False
    moved = False
    # Names relative to open directories: a first login on 100,000 messages spends
    # its time in rename(), not in building 200,000 paths.
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    new_fd = os.open(maildir / "new", flags)
    try:
        cur_fd = os.open(maildir / "cur", flags)
        try:
            for key in keys:
                entry = index.entries.get(key)
                if entry is None or not entry.path.startswith("new/"):
                    continue  # vanished before it could be indexed
                name = entry.path[4:]
                target = name if ":" in name else name + SEEN_INFO
                try:
                    os.rename(name, target, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
                except OSError as exc:
                    log.warning("maildrop of %s: cannot move %s to cur/: %s", user, key, exc)
                    continue
                entry.path = f"cur/{target}"
                moved = True
        finally:
            os.close(cur_fd)
    finally:
        os.close(new_fd)
    return moved


def header_is_current(header: IndexHeader, cur_mtime: int) -> bool:
    """Whether the header's totals describe cur/ as it is (new/ holds only arrivals)."""
    return bool(header.cur_mtime) and header.cur_mtime == cur_mtime and not header.in_new


def count_usage(maildir: Path, new_names: dict[str, str], index: MaildirIndex | None) -> Usage:
    """Count what cur/ and new/ hold, sizing files from the index where it knows them."""
    entries = index.entries if index is not None else {}
    cur_names, _ = scan_messages(maildir / "cur")
    count = 0
    octets = 0
    for directory, names in (("cur", cur_names), ("new", new_names)):
        for key, name in names.items():
            if directory == "new" and key in cur_names:
                continue
            count += 1
            entry = entries.get(key)
            octets += entry.size if entry else estimate_size(maildir / directory, name)
    return Usage(count, octets)


def warn_duplicates(user: str, directory: str, names: list[str]) -> None:
    for name in names:
        log.warning(
            "maildrop of %s: %s/%s repeats the key of another message; ignored",
            user,
            directory,
            name,
        )
