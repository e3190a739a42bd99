"""The parsed indexes one worker process keeps for the maildrops no session holds.

A session takes its maildrop's index out of the cache at login and hands it back when
it ends, so a warm login skips reading and parsing the index file. An entry is only
used while the file's signature is unchanged (another process may have written it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

from popbox.store.base import MessageTable
from popbox.store.index import IndexColumns, MaildirIndex
from popbox.store.index_file import IndexSignature

__all__ = ["INDEX_CACHE_MESSAGES", "IndexCache", "LoadedIndex"]

# Parsed indexes kept per worker process for maildrops no session holds, counted in
# messages (about 0.5 KB each): a 100,000-message maildrop fits, so its warm login
# skips parsing; many small maildrops share the rest.
INDEX_CACHE_MESSAGES: Final = 150_000


class LoadedIndex:
    """An index as read from or written to disk, with the signature of that file.

    The snapshot (UIDLs and sizes as a MessageTable) and the paths and UIDs in the
    same order are taken once per index version and shared by the sessions that open
    the maildrop while the file stays unchanged. For an index just read from its file
    they are the file's own columns, so a warm login on 100,000 messages makes no
    per-message object, even in a worker process that has never seen the maildrop.
    """

    __slots__ = ("_columns", "_table", "index", "signature")

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

    def snapshot(self) -> tuple[MessageTable, IndexColumns]:
        """The snapshot and the columns it came from, both in UID order."""
        if self._columns is None:
            self._columns = self.index.columns()
        if self._table is None:
            columns = self._columns
            # The index makes every UIDL as 16+ hex digits: checked by construction.
            # The core keeps the listings it renders in the table, once per version.
            self._table = MessageTable(columns.uidls, columns.sizes, uidls_checked=True)
        return self._table, self._columns


class IndexCache:
    """Loaded indexes by user, least recently handed back first, bounded in messages.

    Safe to use from the event loop and worker threads at once. An index taken out
    belongs to the session that took it (which may change it) until it is handed
    back; one in the cache is changed by nobody.
    """

    def __init__(self, max_messages: int = INDEX_CACHE_MESSAGES) -> None:
        self._max_messages = max_messages
        self._loaded: OrderedDict[str, LoadedIndex] = OrderedDict()
        self._guard = threading.Lock()

    def take(self, user: str) -> LoadedIndex | None:
        """Take ``user``'s index out of the cache (None if it holds none)."""
        with self._guard:
            return self._loaded.pop(user, None)

    def keep(self, user: str, loaded: LoadedIndex) -> None:
        """Hand back the index of a maildrop a session is done with; it must match
        the index file as it is now. The least recently kept go first when the
        cache is over its bound; an index bigger than the bound is not kept."""
        with self._guard:
            self._loaded.pop(user, None)
            if len(loaded.index) > self._max_messages:
                return
            self._loaded[user] = loaded
            total = sum(len(item.index) for item in self._loaded.values())
            while total > self._max_messages:
                _, evicted = self._loaded.popitem(last=False)
                total -= len(evicted.index)

    def peek(self, user: str) -> LoadedIndex | None:
        """``user``'s index, left in the cache, for a look that changes nothing."""
        with self._guard:
            return self._loaded.get(user)

    def users(self) -> list[str]:
        """The users whose indexes are cached, least recently kept first."""
        with self._guard:
            return list(self._loaded)

    def clear(self) -> None:
        with self._guard:
            self._loaded.clear()
