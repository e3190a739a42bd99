"""The per-process cache of parsed indexes: a session takes its index out and hands it
back; the cache stays within its bound in messages (device views counted), least
recently kept out first."""

from __future__ import annotations

from popbox.store.devices import UidSet
from popbox.store.index import MaildirIndex
from popbox.store.index_cache import VIEW_MESSAGES_PER_INDEX_MESSAGE, IndexCache, LoadedIndex


def loaded(messages: int) -> LoadedIndex:
    index = MaildirIndex(uidvalidity=1)
    index.assign_all([f"cur/{n}.x.host:2," for n in range(messages)], [10] * messages)
    return LoadedIndex(index, (1, 2, 3, 4))


def test_a_taken_index_belongs_to_its_session_until_handed_back() -> None:
    cache = IndexCache()
    alice = loaded(2)
    cache.keep("alice", alice)
    assert cache.peek("alice") is alice  # a look leaves it in place
    assert cache.take("alice") is alice
    assert cache.take("alice") is None  # a second session must read the file
    assert cache.peek("alice") is None
    cache.keep("alice", alice)
    assert cache.users() == ["alice"]
    cache.clear()
    assert cache.users() == []


def test_the_least_recently_kept_go_first_and_the_too_big_not_at_all() -> None:
    cache = IndexCache(max_messages=5)
    cache.keep("alice", loaded(2))
    cache.keep("bob", loaded(2))
    cache.keep("alice", loaded(2))  # handed back again: now the most recent
    cache.keep("carol", loaded(2))
    assert cache.users() == ["alice", "carol"]
    cache.keep("carol", loaded(6))  # bigger than the whole cache: its old one goes too
    assert cache.users() == ["alice"]


def test_the_snapshot_is_taken_once_per_index_version() -> None:
    version = loaded(3)
    table, columns = version.snapshot()
    assert version.snapshot()[0] is table
    assert list(table.sizes) == [10, 10, 10]
    assert list(columns.paths) == [f"cur/{n}.x.host:2," for n in range(3)]


def test_device_views_count_in_the_bound_and_go_before_their_index() -> None:
    """A view costs a tenth of an index message per message: many devices' views of
    a folder push other folders out, and a folder whose views alone would overflow
    the cache is kept without them rather than not at all."""
    big = loaded(100)
    for device in range(5):  # each device deleted the message at its own position
        big.view(f"device{device}", UidSet([device + 1, device + 1]), None)
    assert big.views_kept() == 5
    assert big.weight() == 100 + 5 * 99 // VIEW_MESSAGES_PER_INDEX_MESSAGE
    cache = IndexCache(max_messages=155)
    cache.keep("alice", loaded(10))
    cache.keep("bob", big)
    assert cache.users() == ["bob"]  # 10 + 149 > 155: alice went
    tight = IndexCache(max_messages=120)  # 149 alone is too much: views go
    tight.keep("bob", big)
    assert tight.users() == ["bob"]
    assert big.views_kept() == 0
