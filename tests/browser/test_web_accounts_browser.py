"""Accounts on popbox's web page in Chromium, as people use them: logging in (a wrong
password, the session cookie's flags), logging out (the session ends on the server),
an admin adding a user through the form who can then log in, and a user who is no
admin kept from the admin pages."""

from __future__ import annotations

from selenium.webdriver.common.by import By

from support.browser import Browser
from support.browser_web import ThreadedWeb, current_path, log_in, log_out, type_into
from support.web import PASSWORDS

SESSION_COOKIE = "popbox_session"


def test_wrong_password_shows_the_form_again_without_a_session(
    browser: Browser, popbox: ThreadedWeb
) -> None:
    log_in(browser, popbox, "alice", "not-her-password")

    assert current_path(browser) == "/login"
    assert browser.driver.find_element(By.ID, "error").text
    assert browser.driver.get_cookie(SESSION_COOKIE) is None
    browser.open(popbox.page("/search"))
    assert current_path(browser) == "/login"


def test_login_lands_on_search_with_a_secure_strict_httponly_cookie(
    browser: Browser, popbox: ThreadedWeb
) -> None:
    browser.open(popbox.page("/login"))
    browser.screenshot("login")

    log_in(browser, popbox, "alice", PASSWORDS["alice"])

    assert current_path(browser) == "/search"
    assert browser.driver.find_element(By.ID, "current-user").text == "alice"
    cookie = browser.driver.get_cookie(SESSION_COOKIE)
    assert cookie is not None
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
    # Scripts cannot see it (and the page has none to try).
    assert SESSION_COOKIE not in browser.driver.execute_script("return document.cookie")


def test_logout_ends_the_session_on_the_server_too(browser: Browser, popbox: ThreadedWeb) -> None:
    log_in(browser, popbox, "alice", PASSWORDS["alice"])
    old = browser.driver.get_cookie(SESSION_COOKIE)
    assert old is not None

    log_out(browser)

    assert browser.driver.get_cookie(SESSION_COOKIE) is None
    browser.open(popbox.page("/search"))
    assert current_path(browser) == "/login"
    # A copy of the old cookie (a stolen one, a back-up of the profile) is worth nothing.
    browser.driver.add_cookie(
        {"name": SESSION_COOKIE, "value": old["value"], "path": "/", "secure": True}
    )
    browser.open(popbox.page("/search"))
    assert current_path(browser) == "/login"
    assert not browser.driver.find_elements(By.ID, "current-user")


def _listed_users(browser: Browser) -> list[str | None]:
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#users tr.user")
    return [row.get_attribute("data-user") for row in rows]


def test_admin_adds_a_user_through_the_form_who_can_then_log_in(
    browser: Browser, popbox: ThreadedWeb
) -> None:
    log_in(browser, popbox, "root", PASSWORDS["root"])
    browser.driver.find_element(By.ID, "nav-admin-users").click()
    browser.settle()
    assert current_path(browser) == "/admin/users"
    assert "dave" not in _listed_users(browser)

    type_into(browser, "#add-user input[name=username]", "dave")
    type_into(browser, "#add-user input[name=password]", "dave-secret-1")
    type_into(browser, "#add-user input[name=quota_messages]", "500")
    type_into(browser, "#add-user input[name=quota_size]", "50M")
    browser.driver.find_element(By.CSS_SELECTOR, "#add-user button[type=submit]").click()
    browser.wait_until(
        lambda: browser.driver.find_elements(By.ID, "notice"), "the notice of the new user"
    )
    browser.settle()
    browser.screenshot("admin")

    assert "dave" in browser.driver.find_element(By.ID, "notice").text
    assert "dave" in _listed_users(browser)
    assert popbox.user_exists("dave")

    log_out(browser)
    log_in(browser, popbox, "dave", "dave-secret-1")
    assert current_path(browser) == "/search"
    assert browser.driver.find_element(By.ID, "current-user").text == "dave"
    # dave is no admin.
    assert browser.driver.find_elements(By.ID, "nav-admin-users") == []


def test_user_who_is_no_admin_gets_no_admin_page(browser: Browser, popbox: ThreadedWeb) -> None:
    log_in(browser, popbox, "alice", PASSWORDS["alice"])
    assert browser.driver.find_elements(By.ID, "nav-admin-users") == []

    browser.open(popbox.page("/admin/users"))

    statuses = [r.status for r in browser.requests() if r.url == popbox.page("/admin/users")]
    assert statuses == [403]
    assert browser.driver.find_elements(By.ID, "add-user") == []
    assert _listed_users(browser) == []


def test_back_button_after_logout_shows_no_mail(browser: Browser, popbox: ThreadedWeb) -> None:
    popbox.archive("alice", b"Subject: Zeppelin secrets\r\n\r\nThe hangar code is 4711.\r\n")
    log_in(browser, popbox, "alice", PASSWORDS["alice"])
    browser.open(popbox.page("/search?q=hangar"))
    assert "Zeppelin secrets" in browser.driver.page_source

    log_out(browser)
    browser.driver.back()
    browser.settle()

    # The page was asked for again (no-store: no copy kept), and without a session
    # that is the login page.
    assert current_path(browser) == "/login"
    assert "Zeppelin secrets" not in browser.driver.page_source
