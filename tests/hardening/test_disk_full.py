"""A full disk during delivery: the MTA is told to retry (LMTP 4.x.x, LDA exit 75) and
no partial message is left behind, neither visible in new/ or cur/ nor in tmp/.

The maildir_root is a 2 MiB tmpfs, so the disk really fills up (ENOSPC from the
kernel), as it would on a mail spool partition.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from popbox.store.maildir import MaildirStore
from support.maildrop import stored_messages
from support.serverproc import deliver_lmtp, make_server, running

EX_TEMPFAIL = 75


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "mail"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mount not permitted here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _message(size: int) -> bytes:
    return b"Subject: fill\r\n\r\n" + (b"y" * 998 + b"\r\n") * (size // 1000)


def _files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


async def _visible(root: Path, user: str) -> list[bytes]:
    store = MaildirStore(root)
    try:
        return await stored_messages(store, user)
    finally:
        await store.close()


def test_disk_full_during_lmtp_delivery_is_temporary_and_leaves_nothing_partial(
    tmp_path: Path, small_disk: Path
) -> None:
    server = make_server(tmp_path / "data")
    config = server.config.read_text().replace(
        f'data_dir = "{server.directory}"\n',
        f'data_dir = "{server.directory}"\n[storage]\nmaildir_root = "{small_disk}"\n',
    )
    server.config.write_text(config)
    with running(server):
        small = _message(200_000)
        assert deliver_lmtp(server.lmtp_port, "alice", small) == 250
        code = deliver_lmtp(server.lmtp_port, "alice", _message(4 * 1024 * 1024))
        assert 400 <= code < 500, code  # the MTA keeps the message and retries
        assert not _files(small_disk / "alice" / "tmp")
        # Room for small mail again: the failure left nothing behind to clean up.
        assert deliver_lmtp(server.lmtp_port, "alice", small) == 250
    messages = asyncio.run(_visible(small_disk, "alice"))
    assert len(messages) == 2
    assert all(message.endswith(small.split(b"\r\n\r\n", 1)[1]) for message in messages)


def test_disk_full_during_local_delivery_exits_tempfail_and_leaves_nothing_partial(
    tmp_path: Path, small_disk: Path
) -> None:
    server = make_server(tmp_path / "data")
    config = server.config.read_text() + f'[storage]\nmaildir_root = "{small_disk}"\n'
    server.config.write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "popbox", "deliver", "--config", str(server.config), "alice"],
        input=_message(4 * 1024 * 1024),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert not _files(small_disk / "alice" / "tmp")
    assert asyncio.run(_visible(small_disk, "alice")) == []
