"""Fixtures for the web page's browser tests: one Chromium for the whole session (it
takes seconds to start), reset to a clean state before each test, and loopback sites
for the other origins a test needs (a tracker, an attacker's page)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.browser import Browser, start_browser
from support.browser_mail import AliceMail, fill_archive
from support.browser_web import ThreadedWeb, serve_in_thread
from support.httpsite import Site, serve_site
from support.web import PASSWORDS, web_config


@pytest.fixture(scope="session")
def browser_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with start_browser(tmp_path_factory.mktemp("chromium")) as browser:
        yield browser


@pytest.fixture
def browser(browser_session: Browser) -> Browser:
    """The session's Chromium on a blank tab, with no cookies and nothing recorded."""
    browser_session.reset()
    return browser_session


@pytest.fixture
def site() -> Iterator[Site]:
    """A loopback origin of the test's own (the page under test, or an attacker's)."""
    with serve_site() as served:
        yield served


@pytest.fixture
def tracker() -> Iterator[Site]:
    """A second loopback origin that only records what reaches it."""
    with serve_site() as served:
        yield served


@pytest.fixture
def popbox(tmp_path: Path) -> Iterator[ThreadedWeb]:
    """popbox's web page on a free loopback port: alice, bob and the admin root
    (support.web.PASSWORDS), a real SqliteArchive, Secure cookies as by default."""
    config = web_config(tmp_path, web={"admins": ["root"], "secure_cookies": True})
    with serve_in_thread(config, PASSWORDS) as web:
        yield web


@pytest.fixture
def alice_mail(popbox: ThreadedWeb, tracker: Site) -> AliceMail:
    """alice's archive (support.browser_mail.fill_archive), its hostile HTML aimed at
    ``tracker``."""
    return fill_archive(popbox, tracker.origin)
