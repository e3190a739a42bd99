"""Logging in and out of popbox's web page in Chromium, as a person does."""

from __future__ import annotations

from selenium.webdriver.common.by import By

from support.browser import Browser
from support.browser_flows import current_path, log_in, log_out
from support.browser_web import ThreadedWeb
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
