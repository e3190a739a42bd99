"""A first or rebuilt index (a cold login): the bulk path must index exactly as the
general path does, or give way to it, so UIDLs and sizes never depend on which ran."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.proto.snapshot import Snapshot, render_listing
from popbox.store import MaildirStore
from popbox.store.base import MessageTable
from popbox.store.index import (
    MaildirIndex,
    UidlColumn,
    messages_by_key,
    sorted_by_arrival,
    wire_field,
)
from popbox.store.index_file import read_index
from popbox.store.maildir_sync import _reconcile_names, _simple_listing, reconcile


def general_listing(cur: list[str], new: list[str]) -> tuple[list[str], list[int | None]]:
    """What the general path makes of the same names: paths by arrival, W= sizes."""
    new_names, _ = messages_by_key(new)
    cur_names, _ = messages_by_key(cur)
    unindexed = {key: f"cur/{name}" for key, name in cur_names.items()}
    for key, name in new_names.items():
        unindexed.setdefault(key, f"new/{name}")
    ordered = sorted_by_arrival(unindexed)
    return [path for _, path in ordered], [wire_field(path[4:]) for _, path in ordered]


# Name parts chosen so that widths, W= fields (valid, malformed, repeated), info
# parts, dotfiles, line breaks and duplicate keys all come up often.
_names = st.builds(
    lambda digits, unique, fields, info: f"{digits}{unique}{fields}{info}",
    st.sampled_from(["1700000000", "1700000001", "999999999", "", "0017", ".1700000002"]),
    st.sampled_from([".M1P2Q3.host", ".M2P2Q3.host", "x", ".a\nb", ".c\rd"]),
    st.sampled_from(["", ",S=10,W=12", ",W=7", ",W=7,W=x", ",W=x", ",W=5,W=6", ",W=", ",W=٣"]),
    st.sampled_from(["", ":2,", ":2,S", ":2,,W=9"]),
)


# Names as Maildir writers make them, so that the bulk path mostly takes them.
_writer_names = st.builds(
    lambda seconds, unique, fields, info: f"{seconds}.M{unique}P1.host{fields}{info}",
    st.integers(1_000_000_000, 1_000_000_099),
    st.integers(0, 30),
    st.sampled_from([",S=10,W=12", ",W=7", ",W=7,W=x", ",W=5,W=6", ",W=3,S=2", ",W=0"]),
    st.sampled_from(["", ":2,", ":2,S", ":2,,W=9", ":2,FS"]),
)


@settings(max_examples=300)  # about one in ten examples is simple and non-trivial
@given(
    st.lists(st.one_of(_names, _writer_names), max_size=8),
    st.lists(st.one_of(_names, _writer_names), max_size=4),
)
def test_the_bulk_path_indexes_as_the_general_path_or_declines(
    cur: list[str], new: list[str]
) -> None:
    cur, new = list(dict.fromkeys(cur)), [name for name in dict.fromkeys(new) if name not in cur]
    simple = _simple_listing(list(cur), list(new))
    if simple is not None:
        assert simple == general_listing(cur, new)


def test_simple_names_take_the_bulk_path() -> None:
    cur = ["1700000002.M2.h,S=5,W=6:2,S", "1700000000.M0.h,W=3,W=4:2,"]
    new = ["1700000001.M1.h,S=9,W=10"]
    assert _simple_listing(cur, new) == (
        [
            "cur/1700000000.M0.h,W=3,W=4:2,",
            "new/1700000001.M1.h,S=9,W=10",
            "cur/1700000002.M2.h,S=5,W=6:2,S",
        ],
        [4, 10, 6],
    )


@pytest.mark.parametrize(
    "cur",
    [
        ["1700000000.a,W=3", "1700000000.a,W=3:2,S"],  # one key twice
        ["1700000000.a,W=3", ".1700000001.b,W=3"],  # a dotfile
        ["1700000000.a,W=3", "170000001.b,W=3"],  # another width: not string order
        ["1700000000.a,W=3", "1700000001.b,S=3"],  # a size to read
    ],
)
def test_names_the_general_path_must_judge_decline_the_bulk_path(cur: list[str]) -> None:
    assert _simple_listing(cur, []) is None


@pytest.mark.parametrize("first_uid", [1, 7, 2**32 - 2])
def test_a_fresh_index_lists_its_uidls_from_their_template(first_uid: int) -> None:
    index = MaildirIndex(uidvalidity=0x65F0A1B2, next_uid=first_uid)
    index.assign_all(["cur/1", "cur/2", "new/3"], [1, 2, 3])
    columns = index.columns()
    uidls = columns.uidls
    assert isinstance(uidls, UidlColumn)
    assert list(uidls) == [index.uidl(uid) for uid in columns.uids]
    assert [uidls.template % uid for uid in uidls.arguments] == list(uidls)
    # The protocol core renders the listing from the template: the same lines.
    fresh = index.columns().uidls
    snapshot = Snapshot(MessageTable(fresh, columns.sizes, uidls_checked=True))
    assert snapshot.listing("UIDL") == render_listing(list(uidls))


def make_maildir(root: Path, cur: dict[str, bytes], new: dict[str, bytes]) -> Path:
    maildir = root / "alice"
    for sub, files in (("cur", cur), ("new", new), ("tmp", {})):
        (maildir / sub).mkdir(parents=True)
        for name, data in files.items():
            (maildir / sub / name).write_bytes(data)
    return maildir


@pytest.mark.parametrize("simple", [True, False])
def test_a_rebuilt_index_is_the_same_whichever_path_built_it(tmp_path: Path, simple: bool) -> None:
    cur = {
        "1700000001.M1.h,S=4,W=5:2,S": b"abc\n",
        "1700000003.M3.h,S=2,W=3:2,": b"x\n",
    }
    new = {"1700000002.M2.h,S=6,W=7": b"hello\n"}
    if not simple:
        new["1700000004.M4.h"] = b"unsized\n"  # read to size it: the general path
    maildir = make_maildir(tmp_path, cur, new)
    os.symlink("/etc/passwd", maildir / "cur" / "1700000000.M0.h,W=9")  # never a message
    bulk = MaildirIndex(uidvalidity=5)
    assert reconcile("alice", maildir, bulk)
    # The general path, on the same (now moved) files, from an equally fresh index.
    general = MaildirIndex(uidvalidity=5)
    names = {sub: messages_by_key(os.listdir(maildir / sub))[0] for sub in ("cur", "new")}
    del names["cur"]["1700000000.M0.h,W=9"]
    _reconcile_names("alice", maildir, general, 0, names["new"], names["cur"])
    assert bulk.columns().paths == general.columns().paths
    assert list(bulk.columns().sizes) == list(general.columns().sizes)
    assert list(bulk.columns().sizes)[:3] == [5, 7, 3]
    assert not os.listdir(maildir / "new")  # moved to cur/ as every reader does


async def test_a_cold_login_lists_every_message_once_with_its_size(tmp_path: Path) -> None:
    cur = {f"{1700000000 + i}.M{i}.h,S=3,W=4:2,": b"ab\n" for i in range(0, 40, 2)}
    new = {f"{1700000000 + i}.M{i}.h,S=3,W=4": b"cd\n" for i in range(1, 40, 2)}
    maildir = make_maildir(tmp_path, cur, new)
    store = MaildirStore(tmp_path)
    maildrop = await store.open_maildrop("alice")
    assert list(maildrop.messages.sizes) == [4] * 40
    uidls = list(maildrop.messages.uidls)
    assert len(set(uidls)) == 40
    await maildrop.release()
    # A new worker (no cache) reads the same UIDLs from the file it wrote.
    again = await MaildirStore(tmp_path).open_maildrop("alice")
    assert list(again.messages.uidls) == uidls
    await again.release()
    written = read_index(maildir)
    assert written is not None
    assert list(written.columns().uidls) == uidls
