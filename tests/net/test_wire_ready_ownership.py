"""The wire-ready file a RETR opens is closed on every path out of the transaction
stage: sent by the zero-copy path, streamed, refused by the outlet, cut short by the
store, or abandoned by a client that left. A leaked descriptor per RETR would run a
busy worker out of them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path

import pytest

from popbox.errors import StoreError
from popbox.net.log import SessionStats
from popbox.net.transaction import BodyInterrupted, TransactionStage
from popbox.proto.events import Retrieve, SnapshotIndex
from popbox.proto.server import ServerConnection, ServerSettings
from popbox.store.base import MessageInfo, WireReadyFile

STORED = b"Subject: x\r\n\r\n.dotted\r\nplain\r\n" * 2000
WIRE = STORED.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class OneFileMaildrop:
    """A maildrop whose one message is a wire-ready file, handed out as the store does."""

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size
        self.opened: list[WireReadyFile] = []
        self.marked: list[int] = []

    @property
    def user(self) -> str:
        return "alice"

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return [MessageInfo("u1", len(STORED))]

    async def read_message(self, index: int) -> AsyncIterator[bytes]:
        raise StoreError("not used: the file is wire-ready")
        yield b""  # pragma: no cover

    async def open_wire_ready(self, index: int) -> WireReadyFile | None:
        file = WireReadyFile(os.open(self._path, os.O_RDONLY), self._size)
        self.opened.append(file)
        return file

    def mark_retrieved(self, index: int) -> None:
        self.marked.append(index)

    async def commit_deletions(self, indexes: Collection[int]) -> None:
        return None

    async def release(self) -> None:
        return None


class Outlet:
    """A transport that records what it got; ``send_file`` behaves as told."""

    def __init__(self, *, files: bool, send_file: str = "sent", drain_fails: bool = False):
        self.data = bytearray()
        self._files = files
        self._send_file = send_file
        self._drain_fails = drain_fails

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, data: list[bytes]) -> None:
        for piece in data:
            self.data += piece

    async def drain(self) -> None:
        if self._drain_fails:
            raise ConnectionResetError("peer left")

    @property
    def can_send_files(self) -> bool:
        return self._files

    async def send_file(self, head: bytes, file: WireReadyFile) -> int | None:
        os.fstat(file.fd)  # open while the outlet has it
        if self._send_file == "sent":
            self.data += head + WIRE
            return len(WIRE)
        if self._send_file == "refused":
            return None
        if self._send_file == "peer-left":
            raise ConnectionResetError("peer left")
        raise OSError("read error mid-body")


def retr() -> Retrieve:
    return Retrieve(SnapshotIndex(0), 1, len(STORED), None)


def conn() -> ServerConnection:
    return ServerConnection(
        ServerSettings(), tls_active=False, stls_available=False, plaintext_auth_allowed=True
    )


@pytest.mark.parametrize(
    ("outlet", "size", "expected"),
    [
        pytest.param(Outlet(files=True), len(STORED), None, id="zero-copy"),
        pytest.param(Outlet(files=False), len(STORED), None, id="streamed"),
        pytest.param(Outlet(files=True, send_file="refused"), len(STORED), None, id="refused"),
        pytest.param(
            Outlet(files=True, send_file="peer-left"), len(STORED), ConnectionError, id="left"
        ),
        pytest.param(
            Outlet(files=True, send_file="failed"), len(STORED), BodyInterrupted, id="failed"
        ),
        pytest.param(
            Outlet(files=False), len(STORED) + 10, BodyInterrupted, id="file-cut-short"
        ),
        pytest.param(
            Outlet(files=False, drain_fails=True), len(STORED), ConnectionError, id="drain"
        ),
    ],
)
async def test_the_wire_ready_file_is_closed_on_every_path(
    tmp_path: Path, outlet: Outlet, size: int, expected: type[BaseException] | None
) -> None:
    """And the message counts as retrieved (EXPIRE) only where it went out whole."""
    path = tmp_path / "message"
    path.write_bytes(STORED)
    maildrop = OneFileMaildrop(path, size)
    stage = TransactionStage(maildrop, SessionStats("s1"), "s1")
    if expected is None:
        await stage.retrieve(conn(), retr(), outlet)
        assert bytes(outlet.data) == b"+OK %d octets\r\n" % len(STORED) + WIRE
        assert maildrop.marked == [0]
    else:
        with pytest.raises(expected):
            await stage.retrieve(conn(), retr(), outlet)
        assert maildrop.marked == []
    (file,) = maildrop.opened
    assert file.closed


def test_a_wire_ready_file_closes_once(tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(b"x\r\n")
    with WireReadyFile(os.open(path, os.O_RDONLY), 3) as file:
        assert os.pread(file.fd, 3, 0) == b"x\r\n"
    assert file.closed
    file.close()  # again: nothing happens (the number may name another file by now)
    with pytest.raises(ValueError, match="closed"):
        _ = file.fd
