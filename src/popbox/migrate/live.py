"""Importing from a POP3 server popbox can only log in to.

The collector's POP3 session (popbox.collector.client: its TLS, STLS and password
handling) logs in, lists UIDL and LIST, and the whole listing is planned before any
message is fetched (popbox.migrate.plan, copy mode). Messages then come over with
pipelined RETRs, in the server's order, and each is delivered with its UIDL. Nothing
is ever deleted on the old server: the session sends no DELE and QUITs.

Exactly once under a crash: the folder's UIDLs are the record. A message whose
planned UIDL the folder holds is not fetched again; a delivery is durable when it
returns, and one cut short by a kill left nothing a session can see (only a file in
tmp/, which the store sweeps). So a killed import, run again, stores each message
once, whatever instant the kill came at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from popbox.collector.client import Downloaded, Pop3Session
from popbox.collector.config import AccountSettings
from popbox.errors import RemoteServerError
from popbox.migrate.apply import FolderResult, existing_uidls
from popbox.migrate.plan import Decision, FolderPlan, SourceMessage, plan_folder

if TYPE_CHECKING:
    from popbox.store.maildir import MaildirStore

__all__ = ["LiveSource", "live_import", "live_plan"]

# Bodies smaller than this stay in memory between RETR and delivery; bigger ones are
# spooled to a file, so a 200 MB message never sits in memory.
KEEP_IN_MEMORY_BELOW: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LiveSource:
    account: AccountSettings
    password: str


async def _open(source: LiveSource) -> Pop3Session:
    session = await Pop3Session.open(source.account)
    try:
        await session.login_password(source.password)
    except BaseException:
        await session.close()
        raise
    return session


async def _listing(session: Pop3Session) -> tuple[dict[int, int], list[SourceMessage]]:
    sizes, uids = await session.listing()
    if uids is None:
        raise RemoteServerError(
            "the server does not answer UIDL: no client can have kept UIDLs from it, so "
            "there are none to take over (popbox fetch copies such a mailbox)"
        )
    sources = [
        SourceMessage(str(number), None, uidl, "UIDL", sizes.get(number))
        for number, uidl in uids.entries
    ]
    return sizes, sources


async def live_plan(source: LiveSource, folder: str) -> FolderPlan:
    """Log in, list, plan, QUIT: what ``live_import`` would do (``--dry-run``)."""
    session = await _open(source)
    try:
        _sizes, sources = await _listing(session)
        await session.quit()
    finally:
        await session.close()
    return plan_folder(folder, sources, copy=True)


async def live_import(
    source: LiveSource, store: MaildirStore, user: str, folder: str, spool: Path
) -> tuple[FolderPlan, FolderResult]:
    """Copy every message of the old mailbox not yet in ``user``'s ``folder``."""
    session = await _open(source)
    try:
        sizes, sources = await _listing(session)
        plan = plan_folder(folder, sources, copy=True)
        held = await existing_uidls(store, user, folder)
        result = FolderResult(folder)
        wanted = {
            int(message.source.key): message.uidl
            for message in plan.messages
            if message.decision is not Decision.SKIP and message.uidl is not None
        }
        todo = [number for number, uidl in wanted.items() if uidl not in held]
        result.already = len(wanted) - len(todo)
        await asyncio.to_thread(spool.mkdir, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=spool, prefix="import-") as directory:
            async for item in session.retrieve(
                todo, sizes, Path(directory), keep_below=KEEP_IN_MEMORY_BELOW
            ):
                if not isinstance(item, Downloaded):
                    number, reply = item
                    raise RemoteServerError(f"RETR {number}: {reply.text}", code=reply.code)
                uidl = wanted[item.number]
                try:
                    await _deliver(store, user, folder, uidl, item)
                finally:
                    if item.data is None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(item.path)
                result.stored += 1
        await session.quit()
    finally:
        await session.close()
    return plan, result


async def _deliver(
    store: MaildirStore, user: str, folder: str, uidl: str, item: Downloaded
) -> None:
    if item.data is not None:
        await store.deliver(user, item.data, folder=folder, uidl=uidl)
        return
    with item.path.open("rb") as body:
        await store.deliver_file(user, body, folder=folder, uidl=uidl)
