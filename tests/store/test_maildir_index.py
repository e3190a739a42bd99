"""The pieces under the Maildir store: name parsing, file sizes, the index file and the
conversion of the formats before it (the streamed size rule itself: tests/test_wireform.py)."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popbox.store import MaildirStore
from popbox.store.index import (
    CorruptIndex,
    MaildirIndex,
    arrival_order,
    is_message_name,
    message_key,
    size_fields,
    sorted_by_arrival,
    wire_field,
    wire_size_of_file,
)
from popbox.store.index_file import (
    INDEX_NAME,
    INDEX_VERSION,
    read_header,
    read_index,
    write_index,
)
from popbox.wireform import wire_size


def test_wire_size_of_file_crosses_chunk_boundaries(tmp_path: Path) -> None:
    data = b"x" * (64 * 1024 - 1) + b"\r\n" + b"y\n" * 70_000 + b"no end"
    path = tmp_path / "m"
    path.write_bytes(data)
    assert wire_size_of_file(path) == wire_size(data)


@pytest.mark.parametrize(
    ("name", "key", "sizes"),
    [
        ("17000.M1P2Q3.host,S=120,W=124:2,S", "17000.M1P2Q3.host,S=120,W=124", (120, 124)),
        ("1700000000.M1P2Q3.host,S=120:2,", "1700000000.M1P2Q3.host,S=120", (120, None)),
        ("1700000000.V801I2345M678.host", "1700000000.V801I2345M678.host", (None, None)),
        ("1700000000.1234_5.host:2,RS", "1700000000.1234_5.host", (None, None)),
        ("1.M1.host,W=x,S=-1,W=7,Z=3:2,", "1.M1.host,W=x,S=-1,W=7,Z=3", (None, 7)),
        ("1.M1.host:2,S,W=99", "1.M1.host", (None, None)),  # fields after ':' are flags
    ],
)
def test_names_split_into_key_and_size_fields(
    name: str, key: str, sizes: tuple[int | None, int | None]
) -> None:
    assert message_key(name) == key
    assert size_fields(name) == sizes


@pytest.mark.parametrize(
    ("name", "ok"),
    [("1.M1.host", True), (".nfs0001", False), ("", False), ("a\nb", False), ("a b", True)],
)
def test_which_names_are_messages(name: str, ok: bool) -> None:
    assert is_message_name(name) is ok


def test_arrival_order_is_delivery_time_then_name() -> None:
    names = ["999999999.b", "1700000000.b", "1700000000.a", "junk", "100.x"]
    assert sorted(names, key=arrival_order) == [
        "100.x",
        "999999999.b",
        "1700000000.a",
        "1700000000.b",
        "junk",
    ]


def sample_index() -> MaildirIndex:
    index = MaildirIndex(uidvalidity=0x6B07CF9C)
    index.assign("1.M1.host,S=3,W=4", 4, "cur/1.M1.host,S=3,W=4:2,S")
    index.assign("2.with space", 10, "new/2.with space")
    index.assign("3.latin1-\udce9", 7, "cur/3.latin1-\udce9:2,")  # a non-UTF-8 byte
    return index


def test_index_round_trips_through_the_file(tmp_path: Path) -> None:
    index = sample_index()
    index.cur_mtime = 1_700_000_000_123_456_789
    del index.entries["1.M1.host,S=3,W=4"]  # a deleted message keeps its UID spent
    write_index(tmp_path, index)
    loaded = read_index(tmp_path)
    assert loaded == index
    assert loaded.next_uid == 4
    assert [loaded.uidl(e.uid) for e in loaded.entries.values()] == [
        "6b07cf9c00000002",
        "6b07cf9c00000003",
    ]
    header = read_header(tmp_path)
    assert header is not None
    assert (header.count, header.octets, header.in_new) == (2, 17, 1)
    assert header.cur_mtime == index.cur_mtime
    assert not (tmp_path / "popbox-index.tmp").exists()


def test_missing_index_reads_as_none(tmp_path: Path) -> None:
    assert read_index(tmp_path) is None
    assert read_header(tmp_path) is None


Columns = dict[str, list[object]]


def rewrite_index(path: Path, edit: Callable[[dict[str, str], Columns], None]) -> None:
    """Let ``edit`` change the header fields or columns, then write a self-consistent
    file (lengths and checksum recomputed), so only the edited invariant is broken."""
    head, _, body = path.read_bytes().partition(b"\n")
    tokens = head.decode().split()
    fields = dict(token.partition("=")[::2] for token in tokens[2:])
    count = int(fields["count"])
    paths_len = int(fields["paths"])
    words = count * 8
    columns: Columns = {
        "uids": list(struct.unpack(f"<{count}Q", body[:words])),
        "sizes": list(struct.unpack(f"<{count}Q", body[words : 2 * words])),
        "paths": body[2 * words : 2 * words + paths_len]
        .decode("utf-8", "surrogateescape")
        .split("\n"),
    }
    fields["version"] = tokens[1]
    edit(fields, columns)
    n = len(columns["uids"])
    paths = "\n".join(map(str, columns["paths"])).encode("utf-8", "surrogateescape")
    new_body = (
        struct.pack(f"<{n}q", *columns["uids"])  # signed: a negative size shows as huge
        + struct.pack(f"<{len(columns['sizes'])}q", *columns["sizes"])
        + paths
    )
    fields["paths"] = str(len(paths))
    fields["crc"] = format(zlib.crc32(new_body), "08x")
    version = fields.pop("version")
    header = " ".join([tokens[0], version] + [f"{k}={v}" for k, v in fields.items()])
    path.write_bytes(header.encode() + b"\n" + new_body)


def test_an_index_rewritten_without_damage_still_reads(tmp_path: Path) -> None:
    """The control for the damage tests: the rewriting itself breaks nothing."""
    write_index(tmp_path, sample_index())
    written = (tmp_path / INDEX_NAME).read_bytes()
    rewrite_index(tmp_path / INDEX_NAME, lambda fields, columns: None)
    assert (tmp_path / INDEX_NAME).read_bytes() == written
    assert read_index(tmp_path) == sample_index()


def _set(column: str, position: int, value: object) -> Callable[[dict[str, str], Columns], None]:
    def edit(fields: dict[str, str], columns: Columns) -> None:
        columns[column][position] = value

    return edit


def _field(name: str, value: str) -> Callable[[dict[str, str], Columns], None]:
    def edit(fields: dict[str, str], columns: Columns) -> None:
        fields[name] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_set("paths", 1, "tmp/2.with space"), id="outside-cur-and-new"),
        pytest.param(_set("uids", 2, 1), id="uids-out-of-order"),
        pytest.param(_set("uids", 2, 9), id="uid-not-below-next"),
        pytest.param(_set("sizes", 1, -10), id="negative-size"),
        pytest.param(_field("octets", "22"), id="octets"),
        pytest.param(_field("in_new", "0"), id="in-new"),
        pytest.param(_field("count", "2"), id="count"),
        pytest.param(_field("next", "four"), id="next-not-a-number"),
        pytest.param(_field("version", "4"), id="unknown-version"),
    ],
)
def test_damaged_index_is_detected(
    tmp_path: Path, edit: Callable[[dict[str, str], Columns], None], request: pytest.FixtureRequest
) -> None:
    write_index(tmp_path, sample_index())
    rewrite_index(tmp_path / INDEX_NAME, edit)
    with pytest.raises(CorruptIndex) as raised:
        read_index(tmp_path)
    if request.node.callspec.id != "next-not-a-number":  # else the header is unreadable
        # The old UIDVALIDITY is kept so the rebuilt index can go above it.
        assert raised.value.uidvalidity == 0x6B07CF9C


def test_a_flipped_bit_anywhere_after_the_header_is_detected(tmp_path: Path) -> None:
    write_index(tmp_path, sample_index())
    path = tmp_path / INDEX_NAME
    data = path.read_bytes()
    start = data.index(b"\n") + 1
    for at in range(start, len(data), 7):
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
        with pytest.raises(CorruptIndex):
            read_index(tmp_path)


# What popbox 0.x wrote: one text line per message (index version 1).
VERSION_1 = (
    "popbox-maildir-index 1 uidvalidity=6b07cf9c next=9 count=2 octets=14 "
    "cur_mtime=0 in_new=1\n"
    "3 4 cur/1.M1.host,S=3,W=4:2,S\n"
    "7 10 new/2.with space\n"
)


def test_a_version_1_index_is_read_with_its_uids_and_marked_for_rewriting(
    tmp_path: Path,
) -> None:
    (tmp_path / INDEX_NAME).write_text(VERSION_1)
    index = read_index(tmp_path)
    assert index is not None
    assert index.outdated_format
    assert (index.uidvalidity, index.next_uid) == (0x6B07CF9C, 9)
    assert index.uidls() == ["6b07cf9c00000003", "6b07cf9c00000007"]
    header = read_header(tmp_path)
    assert header is not None
    assert (header.count, header.octets, header.next_uid) == (2, 14, 9)
    write_index(tmp_path, index)
    again = read_index(tmp_path)
    assert again is not None
    assert again == index
    assert not again.outdated_format
    assert (tmp_path / INDEX_NAME).read_bytes().startswith(b"popbox-maildir-index 3 ")


def version_2_file(
    uidvalidity: int, next_uid: int, entries: list[tuple[int, int, str]], cur_mtime: int = 0
) -> bytes:
    """An index as the popbox before the current format wrote it (version 2): UIDs,
    sizes and paths as now, then the rendered UIDL listing as a fourth column."""
    uids = [uid for uid, _, _ in entries]
    sizes = [size for _, size, _ in entries]
    paths = "\n".join(path for _, _, path in entries).encode("utf-8", "surrogateescape")
    listing = "".join(f"{n} {uidvalidity:08x}{uid:08x}\r\n" for n, uid in enumerate(uids, 1))
    body = (
        struct.pack(f"<{len(uids)}Q", *uids)
        + struct.pack(f"<{len(sizes)}Q", *sizes)
        + paths
        + listing.encode("ascii")
    )
    in_new = sum(path.startswith("new/") for _, _, path in entries)
    header = (
        f"popbox-maildir-index 2 uidvalidity={uidvalidity:x} next={next_uid}"
        f" count={len(uids)} octets={sum(sizes)} cur_mtime={cur_mtime} in_new={in_new}"
        f" paths={len(paths)} uidls={len(listing)} crc={zlib.crc32(body):08x}\n"
    )
    return header.encode("ascii") + body


VERSION_2_ENTRIES = [
    (3, 4, "cur/1.M1.host,S=3,W=4:2,S"),
    (7, 10, "new/2.with space"),
    (8, 7, "cur/3.latin1-\udce9:2,"),
]


def test_a_version_2_index_is_read_with_its_uids_and_rewritten_without_its_listing(
    tmp_path: Path,
) -> None:
    (tmp_path / INDEX_NAME).write_bytes(version_2_file(0x6B07CF9C, 9, VERSION_2_ENTRIES, 17))
    index = read_index(tmp_path)
    assert index is not None
    assert index.outdated_format
    assert (index.uidvalidity, index.next_uid, index.cur_mtime) == (0x6B07CF9C, 9, 17)
    uidls = ["6b07cf9c00000003", "6b07cf9c00000007", "6b07cf9c00000008"]
    assert index.uidls() == uidls
    assert list(index.columns().paths) == [path for _, _, path in VERSION_2_ENTRIES]
    header = read_header(tmp_path)
    assert header is not None
    assert (header.count, header.octets, header.in_new) == (3, 21, 1)
    write_index(tmp_path, index)
    data = (tmp_path / INDEX_NAME).read_bytes()
    assert data.startswith(f"popbox-maildir-index {INDEX_VERSION} ".encode())
    assert b" uidls=" not in data
    assert b"\r\n" not in data  # no listing kept
    again = read_index(tmp_path)
    assert again is not None
    assert not again.outdated_format
    assert again == index
    assert again.uidls() == uidls


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:-1] + b"X", id="checksum"),
        pytest.param(lambda data: data[:-5], id="listing-cut-short"),
        pytest.param(lambda data: data.replace(b" uidls=", b" listing="), id="no-uidls-field"),
    ],
)
def test_a_damaged_version_2_index_is_detected(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    data = version_2_file(0x6B07CF9C, 9, VERSION_2_ENTRIES)
    (tmp_path / INDEX_NAME).write_bytes(damage(data))
    with pytest.raises(CorruptIndex) as raised:
        read_index(tmp_path)
    assert raised.value.uidvalidity == 0x6B07CF9C


def test_a_version_2_listing_of_the_wrong_length_is_detected(tmp_path: Path) -> None:
    """Checksum and lengths right, but the listing a line end short: not what popbox wrote."""
    data = version_2_file(0x6B07CF9C, 9, VERSION_2_ENTRIES)
    head, _, body = data.partition(b"\n")
    body = body.removesuffix(b"3 6b07cf9c00000008\r\n") + b"3 6b07cf9c00000008\n\n"
    fields = dict(token.split(b"=") for token in head.split()[2:])
    fields[b"crc"] = b"%08x" % zlib.crc32(body)
    head = b" ".join([b"popbox-maildir-index", b"2"] + [k + b"=" + v for k, v in fields.items()])
    (tmp_path / INDEX_NAME).write_bytes(head + b"\n" + body)
    with pytest.raises(CorruptIndex):
        read_index(tmp_path)


async def test_a_maildrop_with_a_version_2_index_keeps_every_uidl_at_its_next_login(
    tmp_path: Path,
) -> None:
    store = MaildirStore(tmp_path)
    for number in range(5):
        await store.deliver("alice", b"Subject: %d\n\nbody\n" % number)
    first = await store.open_maildrop("alice")
    uidls = list(first.messages.uidls)
    await first.release()
    # The same state as the popbox before this format left it on disk.
    maildir = tmp_path / "alice"
    written = read_index(maildir)
    assert written is not None
    columns = written.columns()
    entries = list(zip(columns.uids, columns.sizes, columns.paths, strict=True))
    (maildir / INDEX_NAME).write_bytes(
        version_2_file(written.uidvalidity, written.next_uid, entries, written.cur_mtime)
    )
    # The next login (a worker that has not seen the maildrop) converts it.
    second = await MaildirStore(tmp_path).open_maildrop("alice")
    assert list(second.messages.uidls) == uidls
    await second.release()
    assert (maildir / INDEX_NAME).read_bytes().startswith(b"popbox-maildir-index 3 ")
    third = await MaildirStore(tmp_path).open_maildrop("alice")
    assert list(third.messages.uidls) == uidls
    await third.release()


@pytest.mark.parametrize(
    "data", [b"", b"a", b"a\n", b"a\r\n", b"a\nb", b"a\r\nb\r", b"\r\n\n\r\r\n", b"x\n" * 5000]
)
def test_wire_size_of_small_files_matches_the_wire_form(tmp_path: Path, data: bytes) -> None:
    """The one-read path for small files counts exactly as the chunked one does."""
    path = tmp_path / "message"
    path.write_bytes(data)
    assert wire_size_of_file(path) == wire_size(data)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert wire_size_of_file("message", fd) == wire_size(data)
    finally:
        os.close(fd)


# Names built from the characters that matter to the size fields and the order.
_names = st.text(alphabet="0123456789.,:SW=x-", min_size=1, max_size=30)


@given(_names)
def test_wire_field_agrees_with_size_fields(name: str) -> None:
    """The cold login's fast W= lookup must size a message exactly as size_fields."""
    assert wire_field(name) == size_fields(name)[1]


@given(st.lists(_names, unique=True, max_size=30), st.booleans())
def test_sorted_by_arrival_is_arrival_order(names: list[str], same_width: bool) -> None:
    """Both the string sort (equal digit prefixes) and the general one order alike."""
    if same_width:
        names = list(dict.fromkeys(f"17{n:0>8}"[:10] + name for n, name in enumerate(names)))
    paths = {f"key{i}": f"cur/{name}" for i, name in enumerate(names)}
    expected = sorted(paths.items(), key=lambda item: arrival_order(item[1][4:]))
    assert sorted_by_arrival(paths) == expected
