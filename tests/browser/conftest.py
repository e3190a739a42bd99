"""Fixtures for the web page's browser tests: one Chromium for the whole session (it
takes seconds to start), reset to a clean state before each test, and loopback sites
for the other origins a test needs (a tracker, an attacker's page)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from browser_mail import attachment_message, hostile_message, ordinary_messages
from support.browser import Browser, start_browser
from support.httpsite import Site, serve_site
from support.web import PASSWORDS, web_config
from threaded_web import ThreadedWeb, serve_in_thread


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


@dataclass(frozen=True)
class AliceMail:
    """What alice's archive holds: entry ids and the octets each was added with."""

    ordinary: tuple[int, ...]
    attachments: int
    hostile: int
    octets: dict[int, bytes]


@pytest.fixture
def alice_mail(popbox: ThreadedWeb, tracker: Site) -> AliceMail:
    """alice's archive: a dozen everyday messages, one with attachments, and one whose
    HTML aims everything it can at ``tracker``; bob keeps one message of his own."""
    octets: dict[int, bytes] = {}

    def keep(message: bytes) -> int:
        entry_id = popbox.archive("alice", message)
        octets[entry_id] = message
        return entry_id

    ordinary = tuple(keep(message) for message in ordinary_messages("alice@example.org"))
    attachments = keep(attachment_message("alice@example.org"))
    hostile = keep(hostile_message("alice@example.org", tracker.origin))
    popbox.archive("bob", ordinary_messages("bob@example.org")[0])
    return AliceMail(ordinary, attachments, hostile, octets)
