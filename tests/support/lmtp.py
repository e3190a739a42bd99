"""Helpers for delivery tests: configs, user databases, an LmtpService in its own thread.

The service runs in a background event loop so that tests can talk to it with the
blocking stdlib clients an MTA author would use (smtplib.LMTP), exactly as Postfix
would, while the store is inspected through the same loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from popbox.auth.base import PassDB, UserRecord
from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, LmtpSettings, QuotaSettings
from popbox.delivery.lmtp import LmtpService
from popbox.errors import NoSuchFolder
from popbox.store.base import MailStore
from support.maildrop import stored_messages

T = TypeVar("T")


def make_config(tmp_path: Path | None = None, **lmtp: Any) -> Config:
    """A config with LMTP on an ephemeral loopback port; ``quota=`` sets [quota]."""
    quota = lmtp.pop("quota", QuotaSettings())
    settings = {"listen": ["127.0.0.1:0"], **lmtp}
    data: dict[str, Any] = {"lmtp": LmtpSettings(**settings), "quota": quota}
    if tmp_path is not None:
        data["data_dir"] = tmp_path
    return Config(**data)


def users(*names: str, **records: UserRecord) -> MemoryPassDB:
    """A user database holding ``names`` (password "secret") and ``records``."""
    passwords = dict.fromkeys([*names, *records], "secret")
    return MemoryPassDB(passwords, records)


@dataclass
class RunningLmtp:
    """A started LmtpService and the loop it runs on."""

    service: LmtpService
    store: MailStore
    passdb: PassDB
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    stopped: bool = field(default=False)

    @property
    def host(self) -> str:
        return self.service.addresses[0][0]

    @property
    def port(self) -> int:
        return self.service.addresses[0][1]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        """Every message in a folder of ``user``'s mailbox, oldest first (takes and
        drops the lock); none while the folder does not exist yet."""
        try:
            return self.run(stored_messages(self.store, user, folder))
        except NoSuchFolder:
            return []

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.run(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


StartLmtp = Callable[..., RunningLmtp]
