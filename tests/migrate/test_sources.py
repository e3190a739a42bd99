"""The sources of an import: dovecot-uidlist, courierpop3dsizelist, X-UIDL headers."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from popbox.migrate.courier import courier_sources, courier_v0_uidl, parse_sizelist
from popbox.migrate.dovecot import apop3d_header_md5, dovecot_sources, parse_uidlist
from popbox.migrate.template import DEFAULT_UIDL_FORMAT, UidlTemplate
from popbox.migrate.xuidl import xuidl_sources

DEFAULT = UidlTemplate(DEFAULT_UIDL_FORMAT)


def maildir(root: Path, names: list[str], body: bytes = b"Subject: x\n\nx\n") -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / ("cur" if ":" in name else "new") / name).write_bytes(body)
    return root


def test_uidlist_version_3_with_fields() -> None:
    uidlist = parse_uidlist(
        b"3 V1700000000 N4 G0123456789abcdef0123456789abcdef\n"
        b"1 :100.a.host\n"
        b"2 P:legacy-uidl W120 :200.b.host\n"
        b"3 GXYZ O1 :300.c.host:2,S\n"
    )
    assert uidlist.problems == []
    assert (uidlist.version, uidlist.uidvalidity, uidlist.next_uid) == (3, 1700000000, 4)
    assert [(r.uid, r.filename) for r in uidlist.records] == [
        (1, "100.a.host"),
        (2, "200.b.host"),
        (3, "300.c.host:2,S"),
    ]
    assert uidlist.records[1].fields == {"P": ":legacy-uidl", "W": "120"}
    assert uidlist.records[2].fields == {"G": "XYZ", "O": "1"}


def test_uidlist_version_1() -> None:
    uidlist = parse_uidlist(b"1 1234 3\n1 100.a.host:2,\n2 200.b.host\n")
    assert uidlist.problems == []
    assert uidlist.uidvalidity == 1234
    assert [r.filename for r in uidlist.records] == ["100.a.host:2,", "200.b.host"]


def test_corrupt_uidlist_lines_are_reported_one_by_one() -> None:
    uidlist = parse_uidlist(b"3 V5 N9\n1 :a\nx :b\n3 :c/d\n2 :e\n4 p1 :f\n5 :g\n6\n7 :a\n")
    # A bad line is left out and the rest read on; a file named again takes its later UID.
    assert [r.filename for r in uidlist.records] == ["e", "g", "a"]
    assert [r.uid for r in uidlist.records] == [2, 5, 7]
    problems = "\n".join(uidlist.problems)
    assert "line 5:" not in problems
    for line in (3, 4, 6, 8, 9):
        assert f"line {line}:" in problems


@given(st.binary(max_size=300))
def test_any_uidlist_bytes_parse_or_are_reported(data: bytes) -> None:
    uidlist = parse_uidlist(data)
    uids = [record.uid for record in uidlist.records]
    assert uids == sorted(set(uids))
    assert all("/" not in record.filename and record.filename for record in uidlist.records)
    if uidlist.records:
        assert uidlist.version in (1, 3)


def test_dovecot_uidls_saved_field_template_and_unlisted_mail(tmp_path: Path) -> None:
    box = maildir(tmp_path, ["100.a.host:2,S", "200.b.host:2,", "300.c.host", "400.d.host"])
    (box / "dovecot-uidlist").write_bytes(
        b"3 V1700000000 N5 G0\n1 :100.a.host\n2 P :200.b.host\n3 Psaved-3 :300.c.host\n"
        b"4 :gone.host\n"
    )
    folder = dovecot_sources(box, DEFAULT)
    assert [(s.key, s.old_uidl) for s in folder.sources] == [
        ("100.a.host", "000000016553f100"),
        ("200.b.host", "200.b.host"),  # an empty P is the base file name
        ("300.c.host", "saved-3"),
        ("400.d.host", None),  # never listed by Dovecot: popbox's to give
    ]
    assert [s.key for s in folder.missing] == ["gone.host"]


def test_dovecot_pop3_order_field_lists_first(tmp_path: Path) -> None:
    box = maildir(tmp_path, ["1.a", "2.b", "3.c"])
    (box / "dovecot-uidlist").write_bytes(b"3 V9 N4\n1 :1.a\n2 O2 :2.b\n3 O1 :3.c\n")
    assert [s.key for s in dovecot_sources(box, DEFAULT).sources] == ["3.c", "2.b", "1.a"]


def test_a_list_whose_header_cannot_be_read_is_refused_not_guessed(tmp_path: Path) -> None:
    # Every record hides behind the header: importing would give each message a new
    # UIDL, and every client would download the mailbox again.
    box = maildir(tmp_path, ["1.a", "2.b"])
    (box / "dovecot-uidlist").write_bytes(b"3 Vxx N4\n1 P:kept :1.a\n2 :2.b\n")
    folder = dovecot_sources(box, DEFAULT)
    assert folder.unreadable is not None
    assert "corrupt header" in folder.unreadable
    assert folder.sources == []
    (box / "dovecot-uidlist").write_bytes(b"")  # empty: as if Dovecot never listed it
    assert dovecot_sources(box, DEFAULT).unreadable is None
    (box / "courierpop3dsizelist").write_bytes(b"garbage\n1.a 10 1:5\n")
    courier = courier_sources(box)
    assert courier.unreadable is not None
    assert "not a version 2 or 3 header" in courier.unreadable


def test_apop3d_md5_hashes_the_first_received_and_what_came_before() -> None:
    header = (
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Received: from a\r\n by b\r\n"
        b"Received: from c\r\n"
        b"Message-ID: <late@x>\r\n"
        b"Delivered-To: bob@x\r\n\r\n"
    )
    import hashlib

    expected = hashlib.md5(
        b" Mon, 1 Jan 2024 00:00:00 +0000" + b" from a" + b" by b" + b" bob@x"
    ).hexdigest()
    assert apop3d_header_md5(header) == expected


def test_courier_sizelist_versions_and_uidls(tmp_path: Path) -> None:
    sizelist = parse_sizelist(
        b"/3 4 1700000000\n100.a.host:2,S 10 1:1700000000:0\n200.b c.host 20 2:0:1\n"
        b"broken line\n300.d.host 30 3:1700000000\n"
    )
    assert sizelist.version == 3
    assert [(e.filename, e.uidl) for e in sizelist.entries] == [
        ("100.a.host:2,S", "UID1-1700000000"),
        ("200.b c.host", "UID2"),
        ("300.d.host", "UID3-1700000000"),
    ]
    assert len(sizelist.problems) == 1


def test_courier_sizelist_without_a_version_is_refused_whole() -> None:
    assert parse_sizelist(b"100.a.host 10 1:2\n").entries == []
    assert parse_sizelist(b"/1 2 3\n100.a.host 10 1:2\n").entries == []


@given(st.binary(max_size=300))
def test_any_sizelist_bytes_parse_or_are_reported(data: bytes) -> None:
    sizelist = parse_sizelist(data)
    for entry in sizelist.entries:
        assert entry.uid > 0
        assert entry.uidl.startswith("UID")


def test_courier_sources_order_by_time_then_name(tmp_path: Path) -> None:
    box = maildir(tmp_path, ["20.b:2,S", "3.z", "20.a:2,", "99.new"])
    (box / "courierpop3dsizelist").write_bytes(
        b"/3 4 77\n3.z 5 1:77:0\n20.a:2, 5 2:77:0\n20.b:2,S 5 3:77:0\n1.gone 5 9:77:0\n"
    )
    folder = courier_sources(box)
    assert [(s.key, s.old_uidl) for s in folder.sources] == [
        ("3.z", "UID1-77"),
        ("20.a", "UID2-77"),
        ("20.b", "UID3-77"),
        ("99.new", None),
    ]
    assert [s.key for s in folder.missing] == ["1.gone"]


def test_courier_without_a_list_shows_encoded_file_names(tmp_path: Path) -> None:
    box = maildir(tmp_path, ["1.a'b+c d:2,S"])
    folder = courier_sources(box)
    assert [s.old_uidl for s in folder.sources] == ["1.a+27b+2Bc+20d"]
    assert courier_v0_uidl("ok.name") == "ok.name"


def test_xuidl_headers_in_a_maildir(tmp_path: Path) -> None:
    box = maildir(tmp_path / "m", ["2.b", "1.a"])
    (box / "new" / "1.a").write_bytes(b"X-UIDL: abc\r\n\tdef\r\nSubject: 1\r\n\r\nX-UIDL: no\r\n")
    folder = xuidl_sources(box)
    assert [(s.key, s.old_uidl) for s in folder.sources] == [("1.a", "abc def"), ("2.b", None)]


def test_dovecot_with_pop3_reuse_xuidl_shows_the_header_before_the_template(
    tmp_path: Path,
) -> None:
    box = maildir(tmp_path, ["1.a:2,S", "2.b:2,S", "3.c:2,S"])
    (box / "cur" / "1.a:2,S").write_bytes(b"X-UIDL: from-qpopper\r\n\r\nx\r\n")
    (box / "cur" / "3.c:2,S").write_bytes(b"X-UIDL: header\r\n\r\nx\r\n")
    (box / "dovecot-uidlist").write_text("3 V5 N4\n1 :1.a\n2 :2.b\n3 Psaved :3.c\n")
    reused = dovecot_sources(box, DEFAULT, reuse_xuidl=True)
    # A saved P field still wins; a message without the header gets the template.
    assert [s.old_uidl for s in reused.sources] == ["from-qpopper", "0000000200000005", "saved"]
    plain = dovecot_sources(box, DEFAULT)
    assert [s.old_uidl for s in plain.sources] == ["0000000100000005", "0000000200000005", "saved"]
