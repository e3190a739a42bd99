"""What one device sees of a Maildir folder: a snapshot over some of the index's messages.

A device that sees everything gets the index version's own snapshot, shared by every
session of that version (store.index_cache): the single-device path costs what it
cost before devices existed. A device with deletions, or a recent-mode login, gets a
``MaildropView``: its own MessageTable over the messages it sees and the map from its
positions to the index's. The state keeps deletions as ranges of UIDs (store.devices),
so what a device sees is a few slices of the index; the view keeps those slices, not a
position per message, and its columns are copied slice by slice in C.

Views are kept with their index version (``LoadedIndex.views``) and reused while the
device's excluded set is the same (and, in recent mode, while no message crossed the
time limit): a warm login of a device with deletions renders no listing again.
"""

from __future__ import annotations

import bisect
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from popbox.store.base import MessageTable
from popbox.store.devices import UidSet
from popbox.store.index import DeferredColumn, IndexColumns

__all__ = ["NO_TIME", "MaildropView", "arrivals_of", "build_view"]

# A name that does not start with a delivery time counts as recent (arrival_order's
# sort key for it); also the bound of an array of signed 64-bit times.
NO_TIME: Final = 1 << 62
# Digits past this many are no delivery time in seconds (year 33658 at 12 digits).
_MAX_TIME_DIGITS: Final = 18
# The leading digits of each DIR/NAME path, one match per line (paths never hold LF).
_NAME_TIME: Final = re.compile(rb"^(?:cur|new)/([0-9]*)", re.M)
_WORDS: Final = "Q"
_TIMES: Final = "q"


class MaildropView:
    """A device's snapshot of one index version and where each message is in the index.

    ``slices`` are ``(start, stop)`` positions in the index, in order; None means the
    whole index (then ``table`` is the version's shared snapshot). ``excluded`` is the
    excluded set it was built for, and a recent-mode view holds while the time limit
    stays within ``[valid_from, valid_until]``.
    """

    __slots__ = ("_full_starts", "_view_starts", "excluded", "table", "valid_from", "valid_until")

    def __init__(
        self,
        table: MessageTable,
        slices: Sequence[tuple[int, int]] | None,
        excluded: UidSet,
        *,
        valid_from: float = float("-inf"),
        valid_until: float = float("inf"),
    ) -> None:
        self.table = table
        self.excluded = excluded
        self.valid_from = valid_from
        self.valid_until = valid_until
        self._full_starts: array[int] | None = None
        self._view_starts: array[int] | None = None
        if slices is not None:
            self._full_starts = array(_WORDS, (start for start, _ in slices))
            self._view_starts = array(_WORDS)
            at = 0
            for start, stop in slices:
                self._view_starts.append(at)
                at += stop - start

    @property
    def whole(self) -> bool:
        """Whether this is the index's own snapshot (positions are the index's)."""
        return self._full_starts is None

    def holds_for(self, excluded: UidSet, cutoff: float | None) -> bool:
        """Whether this view is still what a login with ``excluded`` and the recent
        time limit ``cutoff`` (None: normal mode) would build."""
        if self.excluded != excluded:
            return False
        if cutoff is None:
            return self.valid_from == float("-inf")
        return self.valid_from <= cutoff <= self.valid_until

    def position(self, index: int) -> int:
        """The index position of the view's message ``index``."""
        if self._full_starts is None or self._view_starts is None:
            return index
        if not 0 <= index < len(self.table):
            raise IndexError(f"no message at index {index}")
        piece = bisect.bisect_right(self._view_starts, index) - 1
        return self._full_starts[piece] + index - self._view_starts[piece]

    def positions(self, indexes: Iterable[int]) -> list[int]:
        return [self.position(index) for index in indexes]


def arrivals_of(columns: IndexColumns) -> array[int]:
    """Each message's delivery time from its name, in index order (NO_TIME if none).

    Every common Maildir writer starts the name with the delivery time in seconds
    (index.arrival_order); found in one C-level pass over the paths as stored.
    """
    paths = columns.paths
    if isinstance(paths, DeferredColumn) and paths.source is not None:
        joined = paths.source
    else:
        joined = "\n".join(paths).encode("utf-8", "surrogateescape")
    times = _NAME_TIME.findall(joined) if columns.uids else []
    if len(times) != len(columns.uids):
        raise ValueError("an index path outside cur/ and new/")
    return array(
        _TIMES,
        (int(t) if t and len(t) <= _MAX_TIME_DIGITS else NO_TIME for t in times),
    )


def build_view(
    shared: MessageTable,
    columns: IndexColumns,
    uidl_column: Callable[[Sequence[int]], Sequence[str]],
    excluded: UidSet,
    *,
    arrivals: Sequence[int] | None = None,
    cutoff: float | None = None,
) -> MaildropView:
    """The view of the index whose snapshot is ``shared`` (from ``columns``) for a
    device that does not see ``excluded``; in recent mode (``cutoff`` and the
    ``arrivals`` of ``arrivals_of``) only mail that arrived at ``cutoff`` or later."""
    uids = columns.uids
    slices = _complement(excluded.slices_in(uids), len(uids))
    valid_from, valid_until = float("-inf"), float("inf")
    if cutoff is not None:
        assert arrivals is not None
        slices, oldest_kept = _since(slices, arrivals, cutoff)
        valid_from, valid_until = cutoff, oldest_kept
    if sum(stop - start for start, stop in slices) == len(uids):
        return MaildropView(shared, None, excluded, valid_from=valid_from, valid_until=valid_until)
    view_uids = array(_WORDS)
    # A list like the index's: its slices share the index's int objects (8 octets a
    # message, as an array), and the core sums it at every login, faster than an
    # array whose every item becomes an int on the way.
    view_sizes: list[int] = []
    for start, stop in slices:
        view_uids.extend(uids[start:stop])
        view_sizes.extend(columns.sizes[start:stop])
    # UIDLs made by the index (index.MaildirIndex.uidl_column): checked by
    # construction, and without kept UIDLs the core renders a listing straight from
    # the UIDs (proto.snapshot.TemplatedColumn).
    table = MessageTable(uidl_column(view_uids), view_sizes, uidls_checked=True)
    return MaildropView(table, slices, excluded, valid_from=valid_from, valid_until=valid_until)


def _complement(excluded: Iterable[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The position slices of ``range(length)`` outside the sorted ``excluded`` slices."""
    out: list[tuple[int, int]] = []
    at = 0
    for start, stop in excluded:
        if at < start:
            out.append((at, start))
        at = stop
    if at < length:
        out.append((at, length))
    return out


def _since(
    slices: Iterable[tuple[int, int]], arrivals: Sequence[int], cutoff: float
) -> tuple[list[tuple[int, int]], float]:
    """The parts of ``slices`` that arrived at ``cutoff`` or later, and the oldest
    arrival kept (the view holds until the limit passes it)."""
    out: list[tuple[int, int]] = []
    oldest = float("inf")
    for start, stop in slices:
        run = -1
        for position in range(start, stop):
            arrived = arrivals[position]
            if arrived >= cutoff:
                oldest = min(oldest, arrived)
                if run < 0:
                    run = position
            elif run >= 0:
                out.append((run, position))
                run = -1
        if run >= 0:
            out.append((run, stop))
    return out, oldest
