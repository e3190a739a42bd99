"""popbox's web page served from a thread of its own, and what a person does on it in
Chromium (log in, search, log out).

Selenium blocks while Chromium works, so the page cannot share the test's thread:
``serve_in_thread`` runs support.web's ``running_site`` (uvicorn, the user database,
the mail store and a real SqliteArchive, built from a Config as the composition root
builds them) on an event loop in another thread. ``ThreadedWeb.run`` hands that loop a
coroutine (add a message, look a user up) and waits for its result.

Each person's step waits for the page it leads to, so a test reads as the steps and
fails naming the page that never came.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

from selenium.webdriver.common.by import By

from popbox.archive.base import ArchiveSource
from popbox.archive.sqlite import SqliteArchive
from popbox.config import Config
from support.browser import Browser
from support.web import Site, running_site

__all__ = [
    "ThreadedWeb",
    "current_path",
    "log_in",
    "log_out",
    "search",
    "serve_in_thread",
    "type_into",
]

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

    def archive(self, user: str, message: bytes, *, received: float | None = None) -> int:
        """Keep ``message`` in ``user``'s archive as delivered (at ``received``, default
        now); its entry id."""
        added = self.run(
            self.site.archive.add(user, message, source=ArchiveSource.DELIVERED, received=received)
        )
        return added.entry.id

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


# --- what a person does -------------------------------------------------------


def current_path(browser: Browser) -> str:
    return urlsplit(browser.driver.current_url).path


def type_into(browser: Browser, selector: str, text: str) -> None:
    field = browser.driver.find_element(By.CSS_SELECTOR, selector)
    field.clear()
    field.send_keys(text)


def log_in(browser: Browser, web: ThreadedWeb, user: str, password: str) -> None:
    """Fill the login form as a person does; returns on the page the login led to."""
    browser.open(web.page("/login"))
    type_into(browser, "#username", user)
    type_into(browser, "#password", password)
    browser.driver.find_element(By.ID, "login-submit").click()
    browser.wait_until(
        lambda: current_path(browser) != "/login" or browser.driver.find_elements(By.ID, "error"),
        "the page after the login form",
    )
    browser.settle()


def search(browser: Browser, words: str) -> None:
    """Type ``words`` into the search box and send it."""
    type_into(browser, "#q", words)
    browser.driver.find_element(By.ID, "search-submit").click()
    sent = "q=" + quote(words, safe="").replace("%20", "+")
    browser.wait_until(
        lambda: browser.driver.current_url.endswith(sent), f"the results of {words!r}"
    )
    browser.settle()


def log_out(browser: Browser) -> None:
    browser.driver.find_element(By.CSS_SELECTOR, "#logout button").click()
    browser.wait_until(lambda: current_path(browser) == "/login", "the login page after logout")
    browser.settle()
