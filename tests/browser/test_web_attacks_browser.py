"""Attacks on popbox's web page made with a real browser: another site's page that
posts a form to popbox while an admin is logged in (cross-site request forgery), one
that logs the visitor in under another name (login CSRF), and a user opening another
user's message URLs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from selenium.webdriver.common.by import By

from support.browser import Browser, NetworkRequest
from support.browser_mail import AliceMail
from support.browser_web import ThreadedWeb, current_path, log_in
from support.httpsite import Site
from support.web import PASSWORDS

SESSION_COOKIE = "popbox_session"


def _autosubmit(action: str, fields: dict[str, str]) -> str:
    """An attacker's page: a form that posts itself the moment it loads."""
    inputs = "".join(f'<input name="{name}" value="{value}">' for name, value in fields.items())
    return (
        f'<form id="f" method="post" action="{action}">{inputs}</form>'
        "<script>document.getElementById('f').submit()</script>"
    )


def _posts_to(browser: Browser, url: str) -> list[NetworkRequest]:
    return [r for r in browser.requests() if r.method == "POST" and r.url == url]


@pytest.mark.parametrize("attacker_host", ["127.0.0.1", "localhost"])
def test_csrf_forged_add_user_form_from_another_origin_is_refused(
    browser: Browser, popbox: ThreadedWeb, site: Site, attacker_host: str
) -> None:
    # 127.0.0.1 on another port is the same *site* as popbox: the SameSite=Strict
    # cookie goes along, and only popbox's own checks stand. localhost is another site.
    log_in(browser, popbox, "root", PASSWORDS["root"])
    target = popbox.page("/admin/users/add")
    site.page(
        "/win-a-prize",
        _autosubmit(target, {"username": "mallory", "password": "mallory-pass", "csrf": "guessed"}),
    )

    browser.open(f"http://{attacker_host}:{site.port}/win-a-prize")
    browser.wait_until(lambda: _posts_to(browser, target), "the forged post")
    browser.settle()

    [post] = _posts_to(browser, target)
    assert post.status == 403
    if attacker_host == "127.0.0.1":
        assert SESSION_COOKIE in post.cookies
    assert browser.driver.find_element(By.ID, "error-detail").text
    assert not popbox.user_exists("mallory")
    # The admin is still logged in, and the user list has no mallory.
    browser.open(popbox.page("/admin/users"))
    names = [
        row.get_attribute("data-user")
        for row in browser.driver.find_elements(By.CSS_SELECTOR, "#users tr.user")
    ]
    assert "root" in names
    assert "mallory" not in names


def test_login_csrf_another_site_cannot_log_the_visitor_in_as_its_own_user(
    browser: Browser, popbox: ThreadedWeb, site: Site
) -> None:
    browser.open(popbox.page("/login"))  # the visitor has popbox's login cookie
    target = popbox.page("/login")
    site.page(
        "/",
        _autosubmit(target, {"username": "bob", "password": PASSWORDS["bob"], "csrf": "x"}),
    )

    browser.open(site.url("/"))
    browser.wait_until(lambda: _posts_to(browser, target), "the forged login")
    browser.settle()

    assert [post.status for post in _posts_to(browser, target)] == [403]
    assert browser.driver.get_cookie(SESSION_COOKIE) is None
    browser.open(popbox.page("/search"))
    assert current_path(browser) == "/login"


def test_another_users_message_urls_answer_not_found_and_show_nothing(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    browser.download_to(downloads)
    log_in(browser, popbox, "bob", PASSWORDS["bob"])
    entry = alice_mail.attachments
    urls = [
        popbox.page(f"/message/{entry}"),
        popbox.page(f"/message/{entry}/html"),
        popbox.page(f"/message/{entry}/part/1"),
        popbox.page(f"/message/{entry}/raw"),
    ]

    for url in urls:
        browser.open(url)
        assert "Signed contract" not in browser.driver.page_source
        assert "signed contract.pdf" not in browser.driver.page_source

    statuses = {r.url: r.status for r in browser.requests() if r.url in urls}
    assert statuses == dict.fromkeys(urls, 404)
    assert list(downloads.iterdir()) == []
    # bob's own search shows his one message, none of alice's.
    browser.open(popbox.page("/search"))
    subjects = [link.text for link in browser.driver.find_elements(By.CSS_SELECTOR, "td.subject a")]
    assert subjects == ["Lunch on Friday"]


def test_reflected_xss_in_the_search_box_is_shown_as_text(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail
) -> None:
    payload = '"><script>window.pwned=1</script><img src=x onerror="window.pwned=1">'
    log_in(browser, popbox, "alice", PASSWORDS["alice"])

    browser.open(popbox.page("/search?q=" + quote(payload)))

    driver = browser.driver
    assert driver.title == f"{payload} — Search · popbox"
    assert driver.find_element(By.ID, "q").get_attribute("value") == payload
    # Escaped, not merely stopped by the CSP: no element was made of it, and the CSP
    # had nothing to refuse.
    assert driver.find_elements(By.CSS_SELECTOR, "#main script, img[onerror]") == []
    assert browser.csp_violations() == []
    assert driver.execute_script("return typeof window.pwned") == "undefined"


def test_clickjacking_another_site_cannot_frame_the_logged_in_page(
    browser: Browser, popbox: ThreadedWeb, site: Site, alice_mail: AliceMail
) -> None:
    log_in(browser, popbox, "alice", PASSWORDS["alice"])
    target = popbox.page("/search?q=zeppelin")
    site.page("/", f'<iframe id="victim" src="{target}" width="800" height="600"></iframe>')

    browser.open(site.url("/"))

    # Chromium asked for the page (with alice's cookie: same site) and refused to show it.
    [framed] = [request for request in browser.requests() if request.url == target]
    assert SESSION_COOKIE in framed.cookies
    refusals = [line.text for line in browser.console() if "frame-ancestors" in line.text]
    assert refusals, browser.console()
    driver = browser.driver
    driver.switch_to.frame(driver.find_element(By.ID, "victim"))
    try:
        assert "Zeppelin" not in driver.page_source
        assert driver.find_elements(By.ID, "results") == []
    finally:
        driver.switch_to.default_content()
