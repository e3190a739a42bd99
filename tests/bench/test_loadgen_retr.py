"""The load generator's RETR check (bench.loadgen): byte-exact against the expected
bodies, over a real popbox server on a real socket, and failing on any wrong octet."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from bench.servers import Server

from bench import loadgen, mailgen
from popbox.auth.memory import MemoryPassDB
from popbox.config import Config
from popbox.net.service import Pop3Service
from popbox.store.maildir import MaildirStore

PASSWORD = "correct horse"
MESSAGES = [
    b"Subject: one\n\nHello\n.leading dot\n..two dots\n.\nend\n",
    b".starts with a dot\n",
    b"Subject: twin\n\nsame\n",
    b"Subject: twin\n\nsame\n",  # identical bodies: expected twice
    b"Subject: big\n\n" + b"".join(b".%d\nQUJD\n" % i for i in range(5000)) + b"Y" * 300_000
    + b"\n",
]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    store = MaildirStore(tmp_path / "mail", save_crlf=True)
    for message in MESSAGES:
        await store.deliver("alice", message)
    config = Config.model_validate(
        {"pop3": {"listen": ["127.0.0.1:0"], "plaintext_auth": "loopback"}}
    )
    service = Pop3Service(config, store, MemoryPassDB({"alice": PASSWORD}), None)
    await service.start()
    host, port = service.plain_addresses[0][:2]
    try:
        yield cast(Server, types.SimpleNamespace(host=host, pop3_port=port))
    finally:
        await service.shutdown()


async def download(server: Server, bodies: list[bytes]) -> int:
    client = await loadgen.Pop3Client.connect(server, "plain", None)
    try:
        await client.login("alice", PASSWORD)
        return await loadgen.download_mailbox(client, loadgen.ExpectedBodies(bodies), "alice")
    finally:
        await client.close()


async def test_a_correct_download_passes_and_counts_its_octets(server: Server) -> None:
    bodies = [mailgen.stuffed_wire(message) for message in MESSAGES]
    assert await download(server, bodies) == sum(len(body) for body in bodies)


@pytest.mark.parametrize("where", [0, 1, -1], ids=["first", "second", "last"])
async def test_one_wrong_octet_fails_the_download(server: Server, where: int) -> None:
    bodies = [mailgen.stuffed_wire(message) for message in MESSAGES]
    wrong = bytearray(bodies[4])
    wrong[where] ^= 0x01  # same length: only the bytes differ
    bodies[4] = bytes(wrong)
    with pytest.raises(loadgen.Pop3Error, match="differ"):
        await download(server, bodies)


async def test_a_missing_stuffing_dot_fails_the_download(server: Server) -> None:
    # What a server that forgot to stuff would send: the stored bytes themselves.
    bodies = [mailgen.wire_form(message) for message in MESSAGES]
    with pytest.raises(loadgen.Pop3Error, match="differ"):
        await download(server, bodies)


async def test_identical_messages_must_come_as_often_as_expected(server: Server) -> None:
    bodies = [mailgen.stuffed_wire(message) for message in MESSAGES]
    # The twin expected three times, the first message not at all: same total count.
    bodies[0] = bodies[2]
    with pytest.raises(loadgen.Pop3Error, match="differ"):
        await download(server, bodies)
