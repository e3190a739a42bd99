"""What ``popbox archive import`` finds under a path (popbox.archive.sources): real
files laid out as Thunderbird, a Maildir++ server and a folder of .eml files leave
them, each message with its folder and its octets as the file holds them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from popbox.archive.mboxrd import SPOOL_THRESHOLD
from popbox.archive.sources import (
    Expunged,
    SourceItem,
    SourceMessage,
    Unreadable,
    read_source,
    source_octets,
)
from popbox.errors import ArchiveError


def _messages(items: list[SourceItem]) -> list[tuple[str, bytes]]:
    out = []
    for item in items:
        if isinstance(item, SourceMessage):
            content = item.content
            data = content.read_bytes() if isinstance(content, Path) else content
            out.append((item.folder, data))
    return out


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tb_mbox(*subjects: str, status: str = "0001") -> bytes:
    return b"".join(
        b"From - Mon Jan 06 09:00:00 2020\r\n"
        + f"X-Mozilla-Status: {status}\r\nSubject: {subject}\r\n\r\nbody\r\n\r\n".encode()
        for subject in subjects
    )


def test_thunderbird_local_folders_with_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "Local Folders"
    _write(root / "Inbox", _tb_mbox("in-1", "in-2"))
    _write(root / "Inbox.msf", b'// <!-- <mdb:mork:z v="1.4"/> -->\n')
    _write(root / "Archives", b"")  # an empty folder: an empty file
    _write(root / "Archives.sbd" / "2023", _tb_mbox("old"))
    _write(root / "Archives.sbd" / "2023.msf", b"summary")
    _write(root / "Trash", _tb_mbox("gone", status="0009"))
    _write(root / "msgFilterRules.dat", b'version="9"\n')
    items = list(read_source(root, tmp_path))
    assert _messages(items) == [
        ("Archives/2023", b"X-Mozilla-Status: 0001\r\nSubject: old\r\n\r\nbody\r\n"),
        ("Inbox", b"X-Mozilla-Status: 0001\r\nSubject: in-1\r\n\r\nbody\r\n"),
        ("Inbox", b"X-Mozilla-Status: 0001\r\nSubject: in-2\r\n\r\nbody\r\n"),
    ]
    assert [item.where for item in items if isinstance(item, Expunged)] == ["Trash message 1"]
    assert not [item for item in items if isinstance(item, Unreadable)]


def test_folder_option_names_the_top(tmp_path: Path) -> None:
    root = tmp_path / "tb"
    _write(root / "Inbox", _tb_mbox("a"))
    _write(root / "Inbox.sbd" / "Sub", _tb_mbox("b"))
    assert [folder for folder, _ in _messages(list(read_source(root, tmp_path, "Old")))] == [
        "Old/Inbox",
        "Old/Inbox/Sub",
    ]
    single = list(read_source(root / "Inbox", tmp_path))
    assert [folder for folder, _ in _messages(single)] == ["Inbox"]
    renamed = list(read_source(root / "Inbox", tmp_path, "Kept"))
    assert [folder for folder, _ in _messages(renamed)] == ["Kept"]


def test_maildir_with_maildir_plus_plus_folders(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    for folder in ("", ".Sent", ".Archive.2023"):
        for part in ("cur", "new", "tmp"):
            (root / folder / part).mkdir(parents=True, exist_ok=True)
    _write(root / "new" / "1700000001.M1P1.host", b"Subject: new\n\nLF only\n")
    _write(root / "cur" / "1700000000.M1P1.host:2,S", b"Subject: seen\r\n\r\nCRLF\r\n")
    _write(root / "tmp" / "1700000002.M1P1.host", b"Subject: half-written\n")
    _write(root / ".Sent" / "cur" / "1.M.h:2,S", b"Subject: sent\n\nx\n")
    _write(root / ".Archive.2023" / "cur" / "2.M.h:2,S", b"Subject: old\n\nx\n")
    assert _messages(list(read_source(root, tmp_path))) == [
        ("INBOX", b"Subject: new\n\nLF only\n"),
        ("INBOX", b"Subject: seen\r\n\r\nCRLF\r\n"),
        ("Archive/2023", b"Subject: old\n\nx\n"),
        ("Sent", b"Subject: sent\n\nx\n"),
    ]


def test_directory_of_eml_files_recursively(tmp_path: Path) -> None:
    root = tmp_path / "saved"
    _write(root / "a.eml", b"Subject: a\n\n")
    _write(root / "work" / "b.EML", b"Subject: b\r\n\r\n")
    _write(root / "work" / "notes.txt", b"not mail")
    _write(root / "empty.eml", b"")
    items = list(read_source(root, tmp_path))
    assert _messages(items) == [("INBOX", b"Subject: a\n\n"), ("work", b"Subject: b\r\n\r\n")]
    assert [(item.where, item.reason) for item in items if isinstance(item, Unreadable)] == [
        ("empty.eml", "empty file")
    ]
    assert _messages(list(read_source(root / "a.eml", tmp_path))) == [("INBOX", b"Subject: a\n\n")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_a_file_that_cannot_be_read_is_reported_and_the_rest_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "saved"
    _write(root / "a.eml", b"Subject: a\n\n")
    _write(root / "b.eml", b"Subject: b\n\n")
    (root / "a.eml").chmod(0)
    items = list(read_source(root, tmp_path))
    assert _messages(items) == [("INBOX", b"Subject: b\n\n")]
    assert [item.where for item in items if isinstance(item, Unreadable)] == ["a.eml"]


def test_a_large_file_is_copied_to_the_spool(tmp_path: Path) -> None:
    big = tmp_path / "big.eml"
    big.write_bytes(b"Subject: big\n\n" + b"x" * SPOOL_THRESHOLD)
    spool = tmp_path / "spool"
    spool.mkdir()
    (item,) = list(read_source(big, spool))
    assert isinstance(item, SourceMessage)
    assert isinstance(item.content, Path)
    assert item.spooled
    assert item.content.parent == spool
    assert item.content.read_bytes() == big.read_bytes()
    assert item.size == big.stat().st_size
    assert source_octets(big) == item.size


def test_what_is_no_mail_source_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=r"cannot read .*missing"):
        read_source(tmp_path / "missing", tmp_path)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"Dear diary\n")
    with pytest.raises(ArchiveError, match="not an mbox"):
        read_source(text, tmp_path)


def test_symlink_loop_in_an_import_tree_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "saved"
    _write(root / "a.eml", b"Subject: a\n\n")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    assert _messages(list(read_source(root, tmp_path))) == [("INBOX", b"Subject: a\n\n")]


def test_symlink_to_a_secret_file_is_not_imported(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")
    root = tmp_path / "upload"
    _write(root / "a.eml", b"Subject: a\n\n")
    (root / "b.eml").symlink_to(secret)
    (root / "Inbox").symlink_to(secret)
    _write(root / "Maildir" / "new" / "1.M.h", b"Subject: m\n\n")
    (root / "Maildir" / "cur").mkdir()
    (root / "Maildir" / "cur" / "2.M.h:2,S").symlink_to(secret)
    assert _messages(list(read_source(root, tmp_path))) == [
        ("Maildir", b"Subject: m\n\n"),
        ("INBOX", b"Subject: a\n\n"),
    ]
    # What the administrator names is theirs to name, link or not.
    (tmp_path / "named.eml").symlink_to(root / "a.eml")
    assert _messages(list(read_source(tmp_path / "named.eml", tmp_path))) == [
        ("INBOX", b"Subject: a\n\n")
    ]
