"""The parsed indexes one worker process keeps for the maildrops no session holds.

A session takes its folder's index out of the cache at login and hands it back when
it ends, so a warm login skips reading and parsing the index file. An entry is only
used while the file's signature is unchanged (another process may have written it).
With the index go the folder's device state (store.maildir_state, checked against its
own file's signature) and the views devices had of this index version
(store.maildir_view), so a warm login of a device with deletions builds nothing.
Entries are keyed by folder: ``user`` for INBOX, ``user/.NAME`` for a folder.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from typing import Final

from popbox.store.base import MessageTable
from popbox.store.devices import UidSet
from popbox.store.index import IndexColumns, MaildirIndex
from popbox.store.index_file import IndexSignature
from popbox.store.maildir_state import LoadedState
from popbox.store.maildir_view import MaildropView, arrivals_of, build_view

__all__ = [
    "INDEX_CACHE_MESSAGES",
    "MAX_VIEWS",
    "MAX_VIEW_MESSAGES",
    "VIEW_MESSAGES_PER_INDEX_MESSAGE",
    "IndexCache",
    "LoadedIndex",
]

# Parsed indexes kept per worker process for maildrops no session holds, counted in
# messages (about 0.5 KB each, views counted as below): a 100,000-message maildrop
# with the views of ten devices fits, so their warm logins skip parsing and
# rendering; many small maildrops share the rest.
INDEX_CACHE_MESSAGES: Final = 250_000
# Device views kept per index version, least recently used out first: a family or a
# small team each with its own deletions (the devices beyond it build their view at
# login, a few C-level copies, and render their listings again).
MAX_VIEWS: Final = 32
# ... and at most this many messages in them all (about 50 MB with their listings):
# ten devices of a 100,000-message folder, each with a view of its own. Rendering a
# view's UIDL listing again is most of what a big folder's warm login would cost
# (bench/devices.py measures both).
MAX_VIEW_MESSAGES: Final = 1_000_000
# A message of a view costs 16 octets (UIDs and sizes) and about 35 more once its
# listings are rendered: a tenth of the 0.5 KB an index's message is counted at, so
# ten view messages weigh one index message in the cache's bound.
VIEW_MESSAGES_PER_INDEX_MESSAGE: Final = 10


class LoadedIndex:
    """An index as read from or written to disk, with the signature of that file.

    The snapshot (UIDLs and sizes as a MessageTable) and the paths and UIDs in the
    same order are taken once per index version and shared by the sessions that open
    the maildrop while the file stays unchanged. For an index just read from its file
    they are the file's own columns, so a warm login on 100,000 messages makes no
    per-message object, even in a worker process that has never seen the maildrop.
    """

    __slots__ = (
        "_arrivals",
        "_columns",
        "_table",
        "_views",
        "_whole",
        "index",
        "signature",
        "state",
    )

    def __init__(
        self,
        index: MaildirIndex,
        signature: IndexSignature | None,
        columns: IndexColumns | None = None,
    ) -> None:
        self.index = index
        self.signature = signature
        # Given when known (just written, or kept after a commit); else taken from
        # the index on first use. Nobody changes them once taken.
        self._columns = columns
        self._table: MessageTable | None = None
        self.state: LoadedState | None = None
        """The folder's device state as last read or written (None: not loaded)."""
        # Views by (device, recent mode), least recently used first; and each
        # message's delivery time from its name, for recent-mode views.
        self._views: OrderedDict[tuple[str | None, bool], MaildropView] = OrderedDict()
        self._arrivals: array[int] | None = None
        self._whole: MaildropView | None = None

    def snapshot(self) -> tuple[MessageTable, IndexColumns]:
        """The snapshot and the columns it came from, both in UID order."""
        if self._columns is None:
            self._columns = self.index.columns()
        if self._table is None:
            columns = self._columns
            # The index makes every UIDL as 16+ hex digits, or keeps one that was
            # checked (store.maildir_uidls) and unique: checked by construction.
            # The core keeps the listings it renders in the table, once per version.
            self._table = MessageTable(columns.uidls, columns.sizes, uidls_checked=True)
        return self._table, self._columns

    def view(self, device: str | None, excluded: UidSet, cutoff: float | None) -> MaildropView:
        """What ``device`` (None: popbox's inspecting look) sees of this index version:
        everything but ``excluded`` and, in recent mode, only what arrived at
        ``cutoff`` or later (None: normal mode). Reused while it holds; the whole
        snapshot when nothing is left out."""
        key = (device, cutoff is not None)
        cached = self._views.get(key)
        if cached is not None and cached.holds_for(excluded, cutoff):
            self._views.move_to_end(key)
            return cached
        table, columns = self.snapshot()
        if not excluded and cutoff is None:
            if self._whole is None:  # one per version: the shared snapshot as it is
                self._whole = MaildropView(table, None, excluded)
            return self._whole
        if cutoff is not None and self._arrivals is None:
            self._arrivals = arrivals_of(columns)
        built = build_view(
            table,
            columns,
            self.index.uidl_column,
            excluded,
            arrivals=self._arrivals,
            cutoff=cutoff,
        )
        self._views[key] = built
        self._views.move_to_end(key)
        total = sum(len(view.table) for view in self._views.values() if not view.whole)
        while len(self._views) > MAX_VIEWS or total > MAX_VIEW_MESSAGES:
            _, evicted = self._views.popitem(last=False)
            if not evicted.whole:
                total -= len(evicted.table)
        return built

    def views_kept(self) -> int:
        """How many device views this version keeps (for tests and reports)."""
        return len(self._views)

    def weight(self) -> int:
        """What this entry counts in the cache's bound, in index messages."""
        kept = sum(len(view.table) for view in self._views.values() if not view.whole)
        return len(self.index) + kept // VIEW_MESSAGES_PER_INDEX_MESSAGE

    def drop_views(self) -> None:
        self._views.clear()


class IndexCache:
    """Loaded indexes by user, least recently handed back first, bounded in messages.

    Safe to use from the event loop and worker threads at once. An index taken out
    belongs to the session that took it (which may change it) until it is handed
    back; one in the cache is changed by nobody.
    """

    def __init__(self, max_messages: int = INDEX_CACHE_MESSAGES) -> None:
        self._max_messages = max_messages
        # Each entry with its weight when kept (nobody changes it while cached), and
        # their total, so a keep costs the same with many entries as with one.
        self._loaded: OrderedDict[str, tuple[LoadedIndex, int]] = OrderedDict()
        self._total = 0
        self._guard = threading.Lock()

    def take(self, user: str) -> LoadedIndex | None:
        """Take ``user``'s index out of the cache (None if it holds none)."""
        with self._guard:
            entry = self._loaded.pop(user, None)
            if entry is None:
                return None
            self._total -= entry[1]
            return entry[0]

    def keep(self, user: str, loaded: LoadedIndex) -> None:
        """Hand back the index of a maildrop a session is done with; it must match
        the index file as it is now. The least recently kept go first when the
        cache is over its bound (views counted, ``LoadedIndex.weight``); an index
        bigger than the bound is not kept, and one that is only with its views
        is kept without them."""
        with self._guard:
            old = self._loaded.pop(user, None)
            if old is not None:
                self._total -= old[1]
            weight = loaded.weight()
            if weight > self._max_messages:
                loaded.drop_views()
                weight = len(loaded.index)
                if weight > self._max_messages:
                    return
            self._loaded[user] = (loaded, weight)
            self._total += weight
            while self._total > self._max_messages:
                _, (_, evicted) = self._loaded.popitem(last=False)
                self._total -= evicted

    def peek(self, user: str) -> LoadedIndex | None:
        """``user``'s index, left in the cache, for a look that changes nothing."""
        with self._guard:
            entry = self._loaded.get(user)
            return entry[0] if entry is not None else None

    def users(self) -> list[str]:
        """The users whose indexes are cached, least recently kept first."""
        with self._guard:
            return list(self._loaded)

    def clear(self) -> None:
        with self._guard:
            self._loaded.clear()
            self._total = 0
