"""The interop tests' side: the mailbox served to independent clients, and running one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from popbox.auth.base import PassDB
from popbox.config import Config, LimitSettings, Pop3Settings
from popbox.net.sasl import Mechanisms
from popbox.net.service import Pop3Service
from popbox.store.memory import MemoryStore
from support.maildrop import stored_messages

USER = "alice"
PASSWORD = "s3cret pass"

MESSAGES = [
    b"From: a@example.org\nTo: alice@example.org\nSubject: one\n\nHello\n.leading dot\n"
    b"..two dots\n.\nafter a lone dot\n",
    b"From: b@example.org\r\nTo: alice@example.org\r\nSubject: two\r\n\r\nline 1\r\n"
    b"line 2\r\n",
    b"From: c@example.org\nTo: alice@example.org\nSubject: three\n\n8-bit \xe9\xe8 and a "
    b"bare CR\r in the middle\nno final newline",
]


@dataclass
class InteropServer:
    service: Pop3Service
    store: MemoryStore
    ca: Path
    workdir: Path

    @property
    def plain_port(self) -> int:
        return self.service.plain_addresses[0][1]

    @property
    def tls_port(self) -> int:
        return self.service.tls_addresses[0][1]

    async def stored(self) -> list[bytes]:
        return await stored_messages(self.store, USER)

    async def run(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
        """Run a client; returns (exit status, stdout, stderr). Bounded by a timeout."""
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "LC_ALL": "C",
        }
        environment.update(env or {})
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
            cwd=self.workdir,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out, err


def require(program: str) -> str:
    """The program's path, or skip (scripts/setup-system.sh installs them)."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (run scripts/setup-system.sh)")
    return path


@contextlib.asynccontextmanager
async def serving(
    config: Config,
    passdb: PassDB,
    context: ssl.SSLContext,
    tls_files: Any,
    tmp_path: Path,
    mechanisms: Mechanisms | None = None,
) -> AsyncIterator[InteropServer]:
    """A Pop3Service holding USER's MESSAGES in memory, and a client work directory."""
    store = MemoryStore()
    for message in MESSAGES:
        await store.deliver(USER, message)
    service = Pop3Service(config, store, passdb, context, mechanisms)
    await service.start()
    workdir = tmp_path / "client"
    workdir.mkdir()
    try:
        yield InteropServer(service, store, tls_files.ca, workdir)
    finally:
        await service.shutdown()


def interop_config(**sections: Any) -> Config:
    """127.0.0.1 on port 0, plain and implicit TLS, no failure delay."""
    return Config(
        pop3=Pop3Settings(listen=["127.0.0.1:0"], tls_listen=["127.0.0.1:0"]),
        limits=LimitSettings(auth_failure_delay=0, auth_penalty_max=0, shutdown_grace=1),
        **sections,
    )
