"""What a person does on popbox's web page, in Chromium: log in, search, log out.

Each step waits for the page it leads to, so a test reads as the person's steps and
fails naming the page that never came.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from selenium.webdriver.common.by import By

from support.browser import Browser
from support.browser_web import ThreadedWeb

__all__ = ["current_path", "log_in", "log_out", "search", "type_into"]


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
