"""CRLF storage (storage.save_crlf) and Maildrop.open_wire_ready, the sendfile seam.

A file may be sent as it is only if its stored bytes are its wire form but for the
stuffing dots: no bare LF and a final line end. The store says so by handing out an
open file, and must never say so wrongly (the client would get bare LFs or a body two
octets short of what LIST announced).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from popbox.errors import StoreError
from popbox.store import MaildirStore, MemoryStore, WireReadyFile
from popbox.store.index import size_fields
from popbox.store.maildrop import CHUNK_SIZE
from popbox.wireform import wire_size
from support.maildrop import message_files
from support.wire import crlf

MESSAGES = [
    b"Subject: lf\n\nbare LF line ends\n.dot line\n",
    b"Subject: crlf\r\n\r\nalready CRLF\r\n",
    b"Subject: mixed\r\n\nbare CR \r inside\r\n",
    b"",
    b"\x00\xff 8-bit\n" + b"x" * 5000 + b"\n",
]


async def test_delivery_stores_crlf_with_equal_sizes(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail", save_crlf=True)
    for message in MESSAGES:
        await store.deliver("alice", message)
    files = message_files(tmp_path / "mail" / "alice")
    assert [p.read_bytes() for p in files] == [crlf(m) for m in MESSAGES]
    for path in files:
        stored, virtual = size_fields(path.name)
        # S= is what is on disk and, stored CRLF, the wire size as well.
        assert stored == virtual == path.stat().st_size
    maildrop = await store.open_maildrop("alice")
    assert [m.size for m in maildrop.messages] == [wire_size(m) for m in MESSAGES]
    await maildrop.release()


async def test_streamed_delivery_keeps_a_crlf_split_between_chunks(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail", save_crlf=True)
    # CR as the last octet of one read, its LF the first of the next: one line end.
    message = b"A" * (CHUNK_SIZE - 1) + b"\r\n" + b"B\n" * 10 + b"C" * CHUNK_SIZE + b"\n"
    await store.deliver_file("alice", io.BytesIO(message))
    (path,) = message_files(tmp_path / "mail" / "alice")
    assert path.read_bytes() == crlf(message)


async def test_save_crlf_off_keeps_the_bytes(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail", save_crlf=False)
    await store.deliver("alice", MESSAGES[0])
    (path,) = message_files(tmp_path / "mail" / "alice")
    assert path.read_bytes() == MESSAGES[0]


def read_all(file: WireReadyFile) -> bytes:
    with file:
        return os.pread(file.fd, 1 << 20, 0)


async def test_open_wire_ready_only_for_files_in_wire_form(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    crlf_store = MaildirStore(root, save_crlf=True)
    lf_store = MaildirStore(root, save_crlf=False)
    await crlf_store.deliver("alice", b"Subject: a\n\nstored CRLF\n")
    await lf_store.deliver("alice", b"Subject: b\n\nstored LF\n")
    await crlf_store.deliver("alice", b"Subject: c\n\nno final line end")
    # A foreign file without sizes in its name, CRLF throughout (Dovecot with
    # mail_save_crlf): sized by reading, and as wire-ready as our own.
    (root / "alice" / "new" / "4000000000.M1P1.elsewhere").write_bytes(b"X: y\r\n\r\nz\r\n")
    maildrop = await crlf_store.open_maildrop("alice")
    try:
        ready = [await maildrop.open_wire_ready(i) for i in range(4)]
        assert ready[1] is None  # bare LFs: S= and W= differ
        assert ready[2] is None  # RETR adds the final CRLF: not the file as it is
        first, foreign = ready[0], ready[3]
        assert first is not None
        assert foreign is not None
        assert first.size == maildrop.messages[0].size
        assert read_all(first) == b"Subject: a\r\n\r\nstored CRLF\r\n"
        assert foreign.size == maildrop.messages[3].size
        assert read_all(foreign) == b"X: y\r\n\r\nz\r\n"
    finally:
        await maildrop.release()


async def test_open_wire_ready_follows_a_rename_and_reports_a_vanished_file(
    tmp_path: Path,
) -> None:
    root = tmp_path / "mail"
    store = MaildirStore(root, save_crlf=True)
    await store.deliver("alice", b"Subject: a\n\nfirst\n")
    await store.deliver("alice", b"Subject: b\n\nsecond\n")
    maildrop = await store.open_maildrop("alice")
    try:
        first, second = message_files(root / "alice")
        # A MUA marks the first one seen meanwhile, another deletes the second.
        first.rename(first.with_name(first.name.split(":")[0] + ":2,S"))
        second.unlink()
        ready = await maildrop.open_wire_ready(0)
        assert ready is not None
        assert read_all(ready) == b"Subject: a\r\n\r\nfirst\r\n"
        with pytest.raises(StoreError):
            await maildrop.open_wire_ready(1)
    finally:
        await maildrop.release()


async def test_memory_store_streams_everything() -> None:
    store = MemoryStore()
    await store.deliver("alice", b"Subject: a\r\n\r\nCRLF\r\n")
    maildrop = await store.open_maildrop("alice")
    assert await maildrop.open_wire_ready(0) is None
    await maildrop.release()
