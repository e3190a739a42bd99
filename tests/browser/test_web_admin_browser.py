"""The admin pages of popbox's web page in Chromium: an admin adds a user through the
form, and that user can log in at once; a user who is no admin gets no admin page."""

from __future__ import annotations

from selenium.webdriver.common.by import By

from support.browser import Browser
from support.browser_flows import current_path, log_in, log_out, type_into
from support.browser_web import ThreadedWeb
from support.web import PASSWORDS


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
