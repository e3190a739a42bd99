"""popbox's web page served from a thread of its own, for tests that drive a browser.

Selenium blocks while Chromium works, so the page cannot share the test's thread:
``serve_in_thread`` runs support.web's ``running_site`` (uvicorn, the user database,
the mail store and a real SqliteArchive, built from a Config as the composition root
builds them) on an event loop in another thread. ``ThreadedWeb.run`` hands that loop a
coroutine (add a message, look a user up) and waits for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from popbox.archive.sqlite import SqliteArchive
from popbox.config import Config
from support.web import Site, running_site

__all__ = ["ThreadedWeb", "serve_in_thread"]

# Starting or stopping the page, or one call on its loop, takes milliseconds on
# loopback; past this something hangs and the test should say so.
CALL_TIMEOUT: Final = 60.0

T = TypeVar("T")


class ThreadedWeb:
    """A running web page and a way to call into its loop."""

    def __init__(self, site: Site, loop: asyncio.AbstractEventLoop) -> None:
        self.site = site
        self._loop = loop

    @property
    def url(self) -> str:
        return self.site.url

    @property
    def port(self) -> int:
        return int(self.site.url.rsplit(":", 1)[1])

    def page(self, path: str) -> str:
        return self.site.url + path

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the page's loop and return what it returns."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT)

    def archive(self, user: str, message: bytes) -> int:
        """Keep ``message`` in ``user``'s archive; its entry id."""
        return self.run(self.site.archive_message(user, message))

    def user_exists(self, name: str) -> bool:
        return self.run(self.site.passdb.lookup(name)) is not None


@contextmanager
def serve_in_thread(config: Config, users: Mapping[str, str]) -> Iterator[ThreadedWeb]:
    """Serve the page of ``config`` with ``users`` (name: password) until the block ends."""
    started: Future[ThreadedWeb] = Future()
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        async with running_site(config, users=users) as site:
            if not isinstance(site.archive, SqliteArchive):
                raise AssertionError(f"the page runs on {site.archive!r}, not SqliteArchive")
            stop.append(asyncio.Event())
            started.set_result(ThreadedWeb(site, asyncio.get_running_loop()))
            await stop[0].wait()

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=main, name="popbox-web", daemon=True)
    thread.start()
    web = started.result(CALL_TIMEOUT)
    try:
        yield web
    finally:
        web._loop.call_soon_threadsafe(stop[0].set)
        thread.join(CALL_TIMEOUT)
        if thread.is_alive():
            raise AssertionError("the web page did not stop")
