"""alice's archive through popbox's web page in Chromium: search with the matches
marked, a message, its attachments and the raw message downloaded byte for byte, and
a search exported as an mbox file."""

from __future__ import annotations

import mailbox
from pathlib import Path

from selenium.webdriver.common.by import By

from support.browser import Browser
from support.browser_mail import (
    ATTACHMENT_BIN,
    ATTACHMENT_PDF,
    ATTACHMENT_SUBJECT,
    ZEPPELIN_SUBJECTS,
    AliceMail,
)
from support.browser_web import ThreadedWeb, current_path, log_in, search
from support.web import PASSWORDS


def test_search_lists_the_matches_with_the_word_marked(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail
) -> None:
    log_in(browser, popbox, "alice", PASSWORDS["alice"])

    search(browser, "zeppelin")
    browser.screenshot("search")

    driver = browser.driver
    rows = driver.find_elements(By.CSS_SELECTOR, "#results tr.result")
    subjects = {row.find_element(By.CSS_SELECTOR, "td.subject a").text for row in rows}
    assert subjects == ZEPPELIN_SUBJECTS
    assert driver.find_element(By.ID, "total").text.startswith("3 messages match")
    for row in rows:
        marks = row.find_elements(By.CSS_SELECTOR, ".snippet mark")
        assert marks, row.text
        assert {mark.text.lower() for mark in marks} == {"zeppelin"}
    # Only popbox's own origin was asked for anything.
    assert {request.port for request in browser.requests()} == {popbox.port}
    assert browser.outside_requests() == []


def test_search_with_nothing_found_says_so(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail
) -> None:
    log_in(browser, popbox, "alice", PASSWORDS["alice"])

    search(browser, "subject:zeppelin -budget")
    subjects = {link.text for link in browser.driver.find_elements(By.CSS_SELECTOR, "td.subject a")}
    assert subjects == ZEPPELIN_SUBJECTS - {"Re: Zeppelin budget"}

    search(browser, "hovercraft")
    assert browser.driver.find_element(By.ID, "no-results").is_displayed()
    assert browser.driver.find_elements(By.CSS_SELECTOR, "#results tr.result") == []


def test_message_attachments_and_raw_download_byte_for_byte(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    browser.download_to(downloads)
    log_in(browser, popbox, "alice", PASSWORDS["alice"])
    search(browser, "has:attachment")
    browser.driver.find_element(By.LINK_TEXT, ATTACHMENT_SUBJECT).click()
    browser.settle()

    assert current_path(browser) == f"/message/{alice_mail.attachments}"
    assert browser.driver.find_element(By.ID, "subject").text == ATTACHMENT_SUBJECT
    browser.screenshot("message")
    links = browser.driver.find_elements(By.CSS_SELECTOR, "#attachments a.attachment")
    assert [link.text for link in links] == ["signed contract.pdf", "export-é.bin"]

    saved: dict[str, bytes] = {}
    for link in [*links, browser.driver.find_element(By.ID, "raw")]:
        link.click()
        path = browser.wait_for_download(downloads, set(saved))
        saved[path.name] = path.read_bytes()

    assert saved == {
        "signed contract.pdf": ATTACHMENT_PDF,
        "export-é.bin": ATTACHMENT_BIN,
        f"message-{alice_mail.attachments}.eml": alice_mail.octets[alice_mail.attachments],
    }
    # The downloads left the page where it was.
    assert current_path(browser) == f"/message/{alice_mail.attachments}"


def test_export_of_a_search_is_an_mbox_of_its_matches(
    browser: Browser, popbox: ThreadedWeb, alice_mail: AliceMail, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    browser.download_to(downloads)
    log_in(browser, popbox, "alice", PASSWORDS["alice"])
    search(browser, "zeppelin")

    browser.driver.find_element(By.ID, "export").click()
    path = browser.wait_for_download(downloads)

    assert path.name == "popbox-export.mbox"
    box = mailbox.mbox(path, create=False)
    try:
        subjects = {message["Subject"] for message in box}
    finally:
        box.close()
    assert subjects == ZEPPELIN_SUBJECTS
    text = path.read_bytes()
    assert text.startswith(b"From carol@example.org ")
    # mboxrd: a body line that reads as a "From " line is quoted, not a new message.
    assert b"\n>From the hangar roof" in text
    assert b"\nFrom the hangar roof" not in text
