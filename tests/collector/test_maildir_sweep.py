"""The Maildir sink sweeps tmp/ of what killed runs left, and of nothing else."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from popbox.collector.base import FetchedMessage
from popbox.collector.config import MaildirSinkSettings
from popbox.collector.sinks.maildir import TMP_STALE_SECONDS, MaildirSink

# A writer that gets stuck inside a delivery: the message comes from a FIFO nobody
# writes, so the sink has created its file in tmp/ and waits for the body.
STUCK_WRITER = """
import asyncio, sys
from pathlib import Path
from popbox.collector.base import FetchedMessage
from popbox.collector.config import MaildirSinkSettings
from popbox.collector.sinks.maildir import MaildirSink
box, fifo = Path(sys.argv[1]), Path(sys.argv[2])
sink = MaildirSink(MaildirSinkSettings(kind="maildir", path=box))
asyncio.run(sink.deliver(FetchedMessage("acct", "u1", 10, "0" * 64, fifo)))
"""


def fetched(tmp_path: Path, data: bytes) -> FetchedMessage:
    path = tmp_path / "spool"
    path.write_bytes(data)
    return FetchedMessage("acct", "u2", len(data), hashlib.sha256(data).hexdigest(), path)


def _killed_writer_leftover(box: Path, tmp_path: Path) -> str:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, str(box), str(fifo)])
    deadline = time.monotonic() + 30
    while not (box / "tmp").exists() or not os.listdir(box / "tmp"):
        assert writer.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    [leftover] = os.listdir(box / "tmp")
    return leftover


def test_leftovers_of_killed_runs_and_stale_files_go_others_stay(tmp_path: Path) -> None:
    box = tmp_path / "box"
    leftover = _killed_writer_leftover(box, tmp_path)
    tmp = box / "tmp"
    host = socket.gethostname()
    # A run of ours on this host that is still alive (pid 1 never goes away).
    alive = f"{int(time.time())}.M1P1Q0K{'a' * 24}.{host}"
    # Another host's file (its pid means nothing here), another program's fresh file.
    elsewhere = f"{int(time.time())}.M1P999999999Q0K{'b' * 24}.otherhost"
    foreign = "1700000000.12345_1.mutt"
    stale_foreign = "1600000000.999_1.procmail"
    for name in (alive, elsewhere, foreign, stale_foreign):
        (tmp / name).write_bytes(b"partial")
    old = time.time() - TMP_STALE_SECONDS - 60
    os.utime(tmp / stale_foreign, (old, old))

    sink = MaildirSink(MaildirSinkSettings(kind="maildir", path=box))
    asyncio.run(sink.deliver(fetched(tmp_path, b"Subject: x\r\n\r\nbody\r\n")))
    remaining = set(os.listdir(tmp))
    assert leftover not in remaining
    assert stale_foreign not in remaining
    assert remaining == {alive, elsewhere, foreign}
    assert len(os.listdir(box / "new")) == 1
