"""A hostile message opened on popbox's web page in Chromium: its HTML tries every way
to run a script or load something, each aimed at a tracker site on loopback (and one
off it). Nothing may run and nothing may be loaded. The same HTML served as a plain
page does both (test_browser_fixture's control), so a quiet tracker here is popbox's
doing."""

from __future__ import annotations

from pathlib import Path

from selenium.webdriver.common.by import By

from support.browser import Browser
from support.browser_mail import (
    HOSTILE_MARKER,
    HOSTILE_SUBJECT,
    PWNED,
    AliceMail,
)
from support.browser_web import ThreadedWeb, current_path, log_in
from support.httpsite import Page, Site
from support.web import PASSWORDS

READ_STATE = "return [document.readyState, location.href, document.title, typeof window.pwned]"


def _open_hostile(browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail) -> None:
    log_in(browser, popbox, "alice", PASSWORDS["alice"])
    browser.open(popbox.page(f"/message/{alice_mail.hostile}"))


def _frame_state(browser: Browser) -> list[str]:
    """[readyState, location, title, typeof pwned] of the message's HTML frame."""
    driver = browser.driver
    driver.switch_to.frame(driver.find_element(By.ID, "html-frame"))
    try:
        state: list[str] = driver.execute_script(READ_STATE)
        return state
    finally:
        driver.switch_to.default_content()


def test_tracking_pixel_and_every_remote_load_in_html_mail_reach_nobody(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail, tracker: Site
) -> None:
    tracker.page("/external.js", Page(b"window.pwned = 1;", "text/javascript"))
    _open_hostile(browser, popbox, alice_mail)
    frame_url = popbox.page(f"/message/{alice_mail.hostile}/html")
    browser.wait_until(lambda: _frame_state(browser)[0] == "complete", "the message frame")

    # The message was shown (so there was something to load from), and the recorder
    # saw the frame's own request (so it would have seen the frame's loads).
    assert frame_url in [request.url for request in browser.requests()]
    driver = browser.driver
    driver.switch_to.frame(driver.find_element(By.ID, "html-frame"))
    assert HOSTILE_MARKER in driver.find_element(By.TAG_NAME, "body").text
    driver.switch_to.default_content()

    assert tracker.requests == []
    assert browser.outside_requests() == []
    asked = [request for request in browser.requests() if request.port != popbox.port]
    assert [request for request in asked if request.sent] == [], asked
    # No <meta refresh> or <base> moved the frame or the page anywhere.
    assert _frame_state(browser)[1] == frame_url
    assert current_path(browser) == f"/message/{alice_mail.hostile}"


def test_script_in_html_mail_does_not_run_inline_external_or_in_handlers(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail, tracker: Site
) -> None:
    tracker.page("/external.js", Page(b"window.pwned = 1;", "text/javascript"))
    _open_hostile(browser, popbox, alice_mail)
    browser.wait_until(lambda: _frame_state(browser)[0] == "complete", "the message frame")

    # Every script of the message would set the title and window.pwned.
    driver = browser.driver
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert driver.title == f"{HOSTILE_SUBJECT} · popbox"
    _, _, frame_title, frame_pwned = _frame_state(browser)
    assert (frame_title, frame_pwned) == ("", "undefined")
    # The subject's and the text part's markup are shown as the text they are.
    assert driver.find_element(By.ID, "subject").text == HOSTILE_SUBJECT
    assert f"<script>{PWNED}()</script>" in driver.find_element(By.ID, "text").text
    assert driver.find_elements(By.CSS_SELECTOR, "#main script") == []


def test_javascript_link_and_form_in_html_mail_do_nothing_when_clicked(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail, tracker: Site
) -> None:
    _open_hostile(browser, popbox, alice_mail)
    browser.wait_until(lambda: _frame_state(browser)[0] == "complete", "the message frame")
    frame_url = popbox.page(f"/message/{alice_mail.hostile}/html")

    driver = browser.driver
    driver.switch_to.frame(driver.find_element(By.ID, "html-frame"))
    # A person clicks what the mail offers: the link and, were it kept, the button.
    driver.find_element(By.PARTIAL_LINK_TEXT, "View invoice").click()
    buttons = driver.find_elements(By.ID, "hostile-submit")
    for button in buttons:
        button.click()
    driver.switch_to.default_content()
    browser.settle()

    assert _frame_state(browser)[1:] == [frame_url, "", "undefined"]
    assert tracker.requests_for("/form") == []
    assert tracker.requests == []
    assert browser.outside_requests() == []


def test_html_and_svg_attachments_download_instead_of_running(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail, tracker: Site, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    browser.download_to(downloads)
    _open_hostile(browser, popbox, alice_mail)
    links = browser.driver.find_elements(By.CSS_SELECTOR, "#attachments a.attachment")
    assert [link.text for link in links] == ["invoice.html", "logo.svg"]

    saved: dict[str, bytes] = {}
    for index in (1, 2):
        # Opened straight by its URL, as a link in another mail would open it.
        browser.driver.get(popbox.page(f"/message/{alice_mail.hostile}/part/{index}"))
        path = browser.wait_for_download(downloads, set(saved))
        saved[path.name] = path.read_bytes()

    assert set(saved) == {"invoice.html", "logo.svg"}
    assert b"<script>" in saved["invoice.html"]
    # Neither became a page: the message page is still shown and nothing ran or loaded.
    assert current_path(browser) == f"/message/{alice_mail.hostile}"
    assert browser.driver.title == f"{HOSTILE_SUBJECT} · popbox"
    assert tracker.requests == []
    assert browser.outside_requests() == []
