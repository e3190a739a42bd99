"""An LMTP server to be SIGKILLed: LmtpService over a MaildirStore, for the crash test.

Run as ``python crash_server.py MAIL_ROOT USER...``; it listens on an ephemeral
loopback port, prints that port on stdout when ready, and serves until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, LmtpSettings
from popbox.delivery.lmtp import LmtpService
from popbox.store.maildir import MaildirStore


async def serve(root: Path, names: list[str]) -> None:
    config = Config(lmtp=LmtpSettings(listen=["127.0.0.1:0"]))
    service = LmtpService(config, MaildirStore(root), MemoryPassDB(dict.fromkeys(names, "x")))
    await service.start()
    print(service.addresses[0][1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), sys.argv[2:]))
