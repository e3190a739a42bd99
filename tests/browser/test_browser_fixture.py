"""The browser fixture itself, against plain loopback pages: it records the requests a
page makes, reports a CSP violation, keeps the page off the network, downloads, and
forgets everything between tests. Each check has its positive case beside it, so a
recorder that saw nothing would fail here rather than pass the web page's tests."""

from __future__ import annotations

from pathlib import Path

from support.browser import Browser
from support.browser_mail import SCRIPT_RAN_PATH, hostile_html
from support.httpsite import Page, Site

PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
    b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
SCRIPT_PAGE = "<title>before</title><script>document.title = 'script ran'</script>"


def test_recorder_sees_a_request_to_another_loopback_port(
    browser: Browser, site: Site, tracker: Site
) -> None:
    tracker.page("/pixel.gif", Page(PIXEL, "image/gif"))
    url = site.page("/", f'<title>page</title><img src="{tracker.url("/pixel.gif")}">')

    browser.open(url)

    assert [request.method for request in tracker.requests_for("/pixel.gif")] == ["GET"]
    seen = [request for request in browser.requests() if request.port == tracker.port]
    assert [(request.url, request.kind, request.sent, request.status) for request in seen] == [
        (tracker.url("/pixel.gif"), "Image", True, 200)
    ]
    assert browser.outside_requests() == []


def test_recorder_sees_requests_of_a_cross_site_frame(
    browser: Browser, site: Site, tracker: Site
) -> None:
    # localhost is another site than 127.0.0.1: Chromium may put the frame in its own
    # process, and its requests must still be recorded.
    frame_url = f"http://localhost:{tracker.port}/frame"
    tracker.page("/frame", '<img src="/in-frame.gif">')
    tracker.page("/in-frame.gif", Page(PIXEL, "image/gif"))
    url = site.page("/", f'<iframe src="{frame_url}"></iframe>')

    browser.open(url)
    browser.wait_until(lambda: tracker.requests_for("/in-frame.gif"), "the frame's image")

    urls = [request.url for request in browser.requests()]
    assert f"http://localhost:{tracker.port}/in-frame.gif" in urls


def test_recorder_sees_requests_of_a_sandboxed_srcdoc_frame(
    browser: Browser, site: Site, tracker: Site
) -> None:
    # How a page may show an e-mail's HTML: an opaque-origin frame of its own.
    tracker.page("/in-srcdoc.gif", Page(PIXEL, "image/gif"))
    image = tracker.url("/in-srcdoc.gif")
    url = site.page("/", f"<iframe sandbox srcdoc='<img src=\"{image}\">'></iframe>")

    browser.open(url)
    browser.wait_until(lambda: tracker.requests_for("/in-srcdoc.gif"), "the frame's image")

    assert image in [request.url for request in browser.requests()]


def test_inline_script_runs_without_csp(browser: Browser, site: Site) -> None:
    browser.open(site.page("/", SCRIPT_PAGE))

    assert browser.driver.title == "script ran"
    assert browser.csp_violations() == []


def test_inline_script_blocked_by_csp_header(browser: Browser, site: Site) -> None:
    csp = {"Content-Security-Policy": "default-src 'none'; script-src 'none'"}
    browser.open(site.page("/", Page(SCRIPT_PAGE.encode(), headers=csp)))

    assert browser.driver.title == "before"
    violations = browser.csp_violations()
    assert len(violations) == 1, browser.console()
    assert "inline script" in violations[0].text
    assert "script-src 'none'" in violations[0].text


def test_request_for_a_remote_host_is_trapped_not_sent(browser: Browser, site: Site) -> None:
    url = site.page(
        "/",
        '<img src="http://tracker.example/open.gif">'
        '<link rel="stylesheet" href="https://cdn.example/style.css">',
    )

    browser.open(url)
    browser.wait_until(lambda: len(browser.outside_requests()) >= 2, "both remote requests")

    targets = sorted(request.target for request in browser.outside_requests())
    assert targets == ["cdn.example:443", "http://tracker.example/open.gif"]
    recorded = {request.url for request in browser.requests()}
    assert {"http://tracker.example/open.gif", "https://cdn.example/style.css"} <= recorded


def test_download_arrives_byte_for_byte(browser: Browser, site: Site, tmp_path: Path) -> None:
    content = bytes(range(256)) * 64
    site.page(
        "/file",
        Page(
            content,
            "application/octet-stream",
            headers={"Content-Disposition": 'attachment; filename="blob.bin"'},
        ),
    )
    browser.download_to(tmp_path)
    browser.open(site.page("/", '<a id="get" href="/file">get</a>'))

    browser.driver.find_element("id", "get").click()
    saved = browser.wait_for_download(tmp_path)

    assert saved.name == "blob.bin"
    assert saved.read_bytes() == content


def test_reset_forgets_cookies_and_records(browser: Browser, site: Site) -> None:
    url = site.page("/", Page(b"<p>hi</p>", headers={"Set-Cookie": "session=abc; Path=/"}))
    browser.open(url)
    assert browser.driver.get_cookie("session") is not None
    assert browser.requests()

    browser.reset()
    browser.open(site.page("/other", "<p>again</p>"))

    assert browser.driver.get_cookie("session") is None
    assert "Cookie" not in site.requests_for("/other")[0].headers
    assert [request.url for request in browser.requests()] == [site.url("/other")]


def test_hostile_mail_runs_and_loads_when_served_as_a_plain_page(
    browser: Browser, site: Site, tracker: Site
) -> None:
    # The control for the message page's tests: the same HTML, shown without popbox's
    # sanitiser, sandbox and CSP, runs its scripts and reaches the tracker.
    tracker.page("/external.js", Page(b"window.externalRan = 1;", "text/javascript"))
    tracker.page("/pixel.gif", Page(PIXEL, "image/gif"))
    browser.open(site.page("/", hostile_html(tracker.origin)))

    browser.wait_until(lambda: tracker.requests_for("/refresh"), "the meta refresh")
    seen = {request.path for request in tracker.requests}
    assert {SCRIPT_RAN_PATH, "/external.js", "/pixel.gif", "/link.css", "/frame"} <= seen
    assert {"/style-url.gif", "/base/relative.gif", "/inline-style.gif"} <= seen
    assert "pixel.tracker.example:443" in {r.target for r in browser.outside_requests()}
