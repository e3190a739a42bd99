"""Command sink: runs a program per message with the message on its standard input.

The exit status decides, as for an MDA behind sendmail: 0 delivered, 75 (EX_TEMPFAIL,
sysexits.h) try again later, anything else a permanent refusal (quarantine). A
command that outlives the sink's timeout is killed and counts as a temporary failure.
The command cannot be asked whether it already has a message, so it gets the
idempotency key in ``POPBOX_IDEMPOTENCY_KEY`` and must deduplicate itself if a crash
between its success and the collector's record must not make a second ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from typing import Final

from popbox.collector.base import FetchedMessage
from popbox.collector.config import CommandSinkSettings
from popbox.collector.sinks import SinkContext
from popbox.errors import PermanentSinkError, TemporarySinkError

__all__ = ["CommandSink", "create_sink"]

# sysexits.h EX_TEMPFAIL: the convention sendmail, Postfix and procmail share.
EX_TEMPFAIL: Final = 75
# Keep the start of the command's stderr for the log and the quarantine reason.
STDERR_KEPT: Final = 2000


async def _read_head(stream: asyncio.StreamReader) -> bytes:
    """Read the stream to its end (a full pipe would block the child) keeping the head."""
    head = b""
    while chunk := await stream.read(65536):
        if len(head) < STDERR_KEPT:
            head += chunk[: STDERR_KEPT - len(head)]
    return head


class CommandSink:
    def __init__(self, settings: CommandSinkSettings, account: str) -> None:
        self._settings = settings
        self._argv = shlex.split(settings.command)
        self._account = account

    @property
    def name(self) -> str:
        return self._settings.label

    async def deliver(self, message: FetchedMessage) -> None:
        env = dict(os.environ)
        env.update(self._settings.env)
        env.update(
            POPBOX_ACCOUNT=message.account,
            POPBOX_UIDL=message.uidl,
            POPBOX_SHA256=message.sha256,
            POPBOX_SIZE=str(message.size),
            POPBOX_IDEMPOTENCY_KEY=message.idempotency_key,
        )
        with message.path.open("rb") as stdin:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._argv,
                    stdin=stdin,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                )
            except OSError as exc:
                raise TemporarySinkError(f"{self.name}: cannot start: {exc}") from exc
            try:
                assert process.stderr is not None
                stderr, status = await asyncio.wait_for(
                    asyncio.gather(_read_head(process.stderr), process.wait()),
                    self._settings.timeout,
                )
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                raise TemporarySinkError(
                    f"{self.name}: no exit within {self._settings.timeout:g}s"
                ) from None
        detail = stderr.decode("utf-8", "replace").strip()
        if status == 0:
            return
        reason = f"{self.name}: exit {status}" + (f": {detail}" if detail else "")
        if status == EX_TEMPFAIL:
            raise TemporarySinkError(reason)
        raise PermanentSinkError(reason)

    async def close(self) -> None:
        return None


def create_sink(settings: CommandSinkSettings, context: SinkContext) -> CommandSink:
    return CommandSink(settings, context.account.name)
