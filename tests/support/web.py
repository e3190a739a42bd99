"""The web page under test: everything built from a Config, served by a real uvicorn on
a free loopback port, and an httpx client that logs in as a browser does.

``running_site`` builds the user database, the mail store, the archive and the user
admin the way the composition root does, starts ``serve_web`` on a socket bound to
127.0.0.1:0, and stops it (by cancelling its task, as ``popbox serve`` does) when the
test is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final

import httpx
from starlette.applications import Starlette

from popbox.archive.base import Archive, ArchiveSource
from popbox.archive.sqlite import SqliteArchive
from popbox.auth.base import PassDB
from popbox.auth.useradmin import PasswdFileUserAdmin, UserAdmin
from popbox.backends import build_passdb, build_store, close_passdb
from popbox.config import Config, config_from_dict
from popbox.net.limits import AuthPenalty
from popbox.net.service import bind_addresses
from popbox.store.base import MailStore
from popbox.web.app import create_app, serve_web
from popbox.web.collector_view import collector_view
from popbox.web.context import WebContext
from popbox.web.sessions import COOKIE_NAME
from support.auth import CHEAP

__all__ = [
    "PASSWORDS",
    "Site",
    "StepClock",
    "csrf_token",
    "log_in",
    "make_message",
    "open_archive",
    "running_site",
    "web_config",
]

# The users of the standard site: alice and bob, and root, its admin.
PASSWORDS: Final = {"alice": "alice-secret", "bob": "bob-secret", "root": "root-secret"}
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def web_config(tmp_path: Path, *, web: Mapping[str, Any] | None = None, **top: Any) -> Config:
    """A Config under ``tmp_path`` for the web page: no failure delay and no per-IP
    penalty (the tests about them set them), cookies without Secure unless ``web``
    says so."""
    data: dict[str, Any] = {
        "data_dir": str(tmp_path),
        "limits": {"auth_failure_delay": 0.0, "auth_penalty_max": 0.0},
        "archive": {"keep": ["delivered"]},
        "web": {"enabled": True, "secure_cookies": False, **(web or {})},
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data, tmp_path)


def open_archive(config: Config) -> Archive:
    """The archive the composition root would open for ``config`` (SQLite)."""
    return SqliteArchive(config.archive_path())


class StepClock:
    """A monotonic clock a test moves forward (session expiry without sleeping)."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


@dataclass
class Site:
    """A running web page and the parts it serves from."""

    config: Config
    url: str
    archive: Archive
    passdb: PassDB
    store: MailStore
    useradmin: UserAdmin
    clock: StepClock
    app: Starlette

    @property
    def penalty(self) -> AuthPenalty:
        context = self.app.state.web
        assert isinstance(context, WebContext)
        return context.penalty

    def client(self, *, session: str | None = None) -> httpx.AsyncClient:
        """A browser of this site (with the session cookie ``session``, if given)."""
        cookies = {COOKIE_NAME: session} if session is not None else None
        return httpx.AsyncClient(
            base_url=self.url, follow_redirects=False, timeout=60, cookies=cookies
        )

    async def add_user(self, name: str, password: str) -> None:
        await self.useradmin.add_user(name, password, scheme="SHA512-CRYPT", cost=CHEAP)

    async def archive_message(self, user: str, message: bytes) -> int:
        added = await self.archive.add(user, message, source=ArchiveSource.DELIVERED)
        return added.entry.id


def make_message(
    subject: str,
    body: str = "Hello there.\n",
    *,
    sender: str = "Carol <carol@example.org>",
    to: str = "alice@example.org",
    html: str | None = None,
    attachments: tuple[tuple[str, str, bytes], ...] = (),
    date: str = "Mon, 07 Dec 2026 10:00:00 +0000",
) -> bytes:
    """A message as a client would send it; attachments are (name, type, octets)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = date
    message["Message-ID"] = f"<{abs(hash((subject, body)))}@example.org>"
    message.set_content(body)
    if html is not None:
        message.add_alternative(html, subtype="html")
    for name, kind, data in attachments:
        maintype, subtype = kind.split("/", 1)
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return message.as_bytes()


def csrf_token(html: str) -> str:
    """The CSRF token of the first form on a page."""
    found = _CSRF.search(html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


async def log_in(client: httpx.AsyncClient, user: str, password: str) -> httpx.Response:
    """Log in as a browser does: fetch the form (and its token cookie), post it."""
    form = await client.get("/login")
    token = csrf_token(form.text)
    return await client.post("/login", data={"username": user, "password": password, "csrf": token})


@contextlib.asynccontextmanager
async def running_site(
    config: Config, *, users: Mapping[str, str] | None = None
) -> AsyncIterator[Site]:
    """Serve the web page of ``config`` on a free loopback port, with ``users``
    (name: password) added first."""
    passdb = build_passdb(config)
    store = build_store(config, passdb)
    archive = open_archive(config)
    useradmin = PasswdFileUserAdmin(config.auth.passwd_file, config.auth.credentials_path())
    clock = StepClock()
    app = create_app(
        config,
        archive=archive,
        passdb=passdb,
        store=store,
        useradmin=useradmin,
        # [fetch] paths resolve against the config file's directory in `popbox fetch`;
        # a test's config has none, and data_dir is where its files are.
        collector=collector_view(config.fetch, config.data_dir),
        clock=clock,
    )
    # Bound here (port 0), so the port is known before the server runs and a client
    # may connect at once: the listening socket queues it until uvicorn accepts.
    sock = bind_addresses(["127.0.0.1:0"])[0]
    port = sock.getsockname()[1]
    task = asyncio.create_task(serve_web(config, app, sock=sock))
    site = Site(config, f"http://127.0.0.1:{port}", archive, passdb, store, useradmin, clock, app)
    try:
        for name, password in (users or {}).items():
            await site.add_user(name, password)
        yield site
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await archive.close()
        await store.close()
        await close_passdb(passdb)
        await useradmin.close()
