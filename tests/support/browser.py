"""Debian's Chromium, headless, driven through chromium-driver: what the web page's
tests look at it with, and a record of every request it made.

``start_browser(directory)`` starts one Chromium with a private profile under
``directory`` and yields a ``Browser``. It never reaches past loopback: Chromium's
proxy is a loopback ``Site`` (support.httpsite) that refuses and keeps every request
for anywhere else (loopback itself bypasses a proxy in Chromium), so
``Browser.outside_requests`` lists each attempt to leave the machine, from any frame
or worker (but for Chromium's own calls home, CHROMIUM_OWN_HOSTS). ``Browser.requests``
lists what the page's frames asked for, read from chromedriver's performance log (the
DevTools ``Network`` events), and ``Browser.console`` what its console said (a CSP
violation is logged there).

Starting Chromium costs seconds, so one browser serves a whole test session and
``Browser.reset`` gives each test a clean one (no cookies, no cache, no records).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.wait import WebDriverWait

from support.httpsite import SeenRequest, Site, serve_site

__all__ = [
    "SCREENSHOTS_ENV",
    "Browser",
    "ConsoleLine",
    "NetworkRequest",
    "start_browser",
]

# Debian's /usr/bin/chromium is a launcher script that exports Google API keys and turns
# on remote extensions; the binary behind it starts without either.
CHROMIUM_BINARY: Final = Path("/usr/lib/chromium/chromium")
CHROMIUM_LAUNCHER: Final = Path("/usr/bin/chromium")
CHROMEDRIVER: Final = Path("/usr/bin/chromedriver")
# Screenshots are taken at this size, so docs/archive-*.png look alike run after run.
WINDOW_SIZE: Final = (1280, 900)
# How long a wait for the page (a load, an element, a download) may take on a CI runner
# shared with other jobs before the test fails; it bounds a hang, it measures nothing.
WAIT_TIMEOUT: Final = 30.0
# Polling interval of those waits: the page answers from loopback in milliseconds.
WAIT_POLL: Final = 0.05
# Set to 1 to have ``Browser.screenshot`` write docs/archive-<name>.png (off in CI, so
# a test run does not change the tree).
SCREENSHOTS_ENV: Final = "POPBOX_SCREENSHOTS"
DOCS_DIR: Final = Path(__file__).resolve().parents[2] / "docs"
# A file Chromium is still writing carries this suffix until it is complete.
PARTIAL_DOWNLOAD_SUFFIX: Final = ".crdownload"

# Chromium's own traffic (updates, sync, safe browsing, translation, metrics) would
# reach the outside-world trap and hide what a page asked for; these turn it off.
_QUIET_FLAGS: Final = (
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--safebrowsing-disable-auto-update",
    "--no-pings",
    "--disable-features=Translate,OptimizationHints,MediaRouter,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater,"
    "InterestFeedContentSuggestions,PrivacySandboxSettings4,PasswordLeakDetection,"
    # One renderer for every frame of a page, so the performance log (the top page's
    # DevTools session) sees a cross-site or sandboxed frame's requests too. Process
    # placement changes nothing a page is allowed to do: CSP and sandbox rules stay.
    "site-per-process,IsolateOrigins,IsolateSandboxedIframes,OriginKeyedProcessesByDefault",
    "--disable-site-isolation-trials",
)

# Chromium's own services, which it calls whatever page it shows (seen in a net log of
# an idle browser): Google account cookies (ListAccounts, asked even with sign-in
# off), component updates and network time, Debian's default search engine's
# preconnect. No page under test names these hosts; ``outside_requests`` leaves them
# out and ``all_outside_requests`` keeps them.
CHROMIUM_OWN_HOSTS: Final = frozenset(
    {
        "accounts.google.com",
        "update.googleapis.com",
        "clients2.google.com",
        "start.duckduckgo.com",
    }
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NetworkRequest:
    """One request a frame of the page made, as DevTools reported it.

    ``blocked`` is Chromium's reason when it stopped the request before it left (for
    instance ``csp``), else None; ``status`` is the response's, 0 if none came;
    ``cookies`` the names of the cookies it carried.
    """

    url: str
    method: str
    kind: str
    blocked: str | None = None
    status: int = 0
    cookies: tuple[str, ...] = ()

    @property
    def port(self) -> int | None:
        return urlsplit(self.url).port

    @property
    def sent(self) -> bool:
        """The request left the browser (it was not stopped by a policy)."""
        return self.blocked is None and not self.url.startswith(("data:", "blob:", "about:"))


@dataclass(frozen=True, slots=True)
class ConsoleLine:
    level: str
    source: str
    text: str


@dataclass
class _Recorder:
    """Turns chromedriver's performance and browser logs into requests and lines.

    chromedriver hands out each log entry once, so what it returned is kept here
    until ``clear``.
    """

    requests: dict[str, NetworkRequest] = field(default_factory=dict)
    console: list[ConsoleLine] = field(default_factory=list)
    # DevTools may report a request's cookies before the request itself.
    early_cookies: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def take(self, driver: webdriver.Chrome) -> None:
        # selenium leaves get_log unannotated: a list of dicts, as the W3C log says.
        performance: list[dict[str, Any]] = driver.get_log("performance")  # type: ignore[no-untyped-call]
        browser: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
        for entry in performance:
            message = json.loads(entry["message"])["message"]
            self._network_event(message["method"], message.get("params", {}))
        for entry in browser:
            self.console.append(
                ConsoleLine(entry.get("level", ""), entry.get("source", ""), entry["message"])
            )

    def _network_event(self, method: str, params: dict[str, Any]) -> None:
        request_id = str(params.get("requestId", ""))
        if method == "Network.requestWillBeSent":
            if "redirectResponse" in params:
                self._update(request_id, status=int(params["redirectResponse"]["status"]))
            # A redirect reuses the request id: keep each hop under its own key.
            key = request_id
            while key in self.requests:
                key += "+"
            request = params["request"]
            self.requests[key] = NetworkRequest(
                request["url"],
                request["method"],
                str(params.get("type", "")),
                cookies=self.early_cookies.pop(request_id, ()),
            )
        elif method == "Network.loadingFailed" and params.get("blockedReason"):
            self._update(request_id, blocked=str(params["blockedReason"]))
        elif method == "Network.responseReceived":
            self._update(request_id, status=int(params["response"].get("status", 0)))
        elif method == "Network.requestWillBeSentExtraInfo":
            sent = tuple(
                str(item["cookie"]["name"])
                for item in params.get("associatedCookies", [])
                if not item.get("blockedReasons")
            )
            if not self._update(request_id, cookies=sent):
                self.early_cookies[request_id] = sent

    def _update(self, request_id: str, **changes: Any) -> bool:
        keys = [key for key in self.requests if key.rstrip("+") == request_id]
        if not keys:
            return False
        self.requests[keys[-1]] = dataclasses.replace(self.requests[keys[-1]], **changes)
        return True

    def clear(self) -> None:
        self.requests.clear()
        self.console.clear()
        self.early_cookies.clear()


class Browser:
    """One headless Chromium and what it did since the last ``reset``."""

    def __init__(self, driver: webdriver.Chrome, trap: Site, downloads: Path) -> None:
        self.driver = driver
        self._trap = trap
        self._downloads = downloads
        self._recorder = _Recorder()

    # --- what the page did ---------------------------------------------------------

    def requests(self) -> list[NetworkRequest]:
        """Every request the page's frames made since ``reset``, in order."""
        self._recorder.take(self.driver)
        return list(self._recorder.requests.values())

    def console(self) -> list[ConsoleLine]:
        """Every console line (the page's and Chromium's about it) since ``reset``."""
        self._recorder.take(self.driver)
        return list(self._recorder.console)

    def csp_violations(self) -> list[ConsoleLine]:
        """The console's reports of what the Content-Security-Policy stopped."""
        return [
            line
            for line in self.console()
            if line.source == "security" and "Content Security Policy" in line.text
        ]

    def outside_requests(self) -> list[SeenRequest]:
        """Every request for a host other than loopback, from any frame or worker of
        any page (Chromium's own service calls left out)."""
        return [
            request for request in self._trap.requests if request.host not in CHROMIUM_OWN_HOSTS
        ]

    def all_outside_requests(self) -> list[SeenRequest]:
        """Every request for a host other than loopback, Chromium's own included."""
        return self._trap.requests

    # --- driving it ----------------------------------------------------------------

    def open(self, url: str) -> None:
        """Load ``url`` and wait until it and everything it loads have finished."""
        self.driver.get(url)
        self.settle()

    def settle(self) -> None:
        """Wait until the current document has loaded, subresources included."""
        self.wait_until(
            lambda: self.driver.execute_script("return document.readyState") == "complete",
            "the page to finish loading",
        )

    def wait_until(self, condition: Callable[[], T | None], what: str) -> T:
        """Poll ``condition`` until it is truthy; fail naming ``what`` if it never is."""
        waiter = WebDriverWait(self.driver, WAIT_TIMEOUT, poll_frequency=WAIT_POLL)
        result = waiter.until(lambda _driver: condition(), f"waited for {what}")
        # until() returns only once the condition gave something truthy.
        assert result is not None
        return result

    def download_to(self, directory: Path) -> None:
        """Save every download into ``directory`` without asking."""
        directory.mkdir(parents=True, exist_ok=True)
        self.driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior",
            {"behavior": "allow", "downloadPath": str(directory), "eventsEnabled": False},
        )

    def wait_for_download(self, directory: Path, known: set[str] | None = None) -> Path:
        """The first complete file in ``directory`` not named in ``known``: no partial
        file beside it, and the same size on two polls in a row."""
        skip = known or set()
        last_size: list[int] = []

        def finished() -> Path | None:
            names = {path.name for path in directory.iterdir()}
            fresh = sorted(names - skip)
            if not fresh or any(name.endswith(PARTIAL_DOWNLOAD_SUFFIX) for name in names):
                return None
            size = (directory / fresh[0]).stat().st_size
            steady = last_size == [size]
            last_size[:] = [size]
            return directory / fresh[0] if steady else None

        return self.wait_until(finished, f"a download into {directory}")

    def screenshot(self, name: str) -> Path | None:
        """Write docs/archive-<name>.png when SCREENSHOTS_ENV is 1; the path, or None."""
        if os.environ.get(SCREENSHOTS_ENV) != "1":
            return None
        path = DOCS_DIR / f"archive-{name}.png"
        if not self.driver.save_screenshot(str(path)):
            raise AssertionError(f"Chromium could not write the screenshot {path}")
        return path

    def reset(self) -> None:
        """Back to a blank tab with no cookies, cache, storage or records, saving
        downloads where they went at the start."""
        handles = self.driver.window_handles
        for handle in handles[1:]:
            self.driver.switch_to.window(handle)
            self.driver.close()
        self.driver.switch_to.window(handles[0])
        self.driver.get("about:blank")
        self.driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
        self.driver.execute_cdp_cmd("Network.clearBrowserCache", {})
        self.driver.execute_cdp_cmd(
            "Storage.clearDataForOrigin", {"origin": "*", "storageTypes": "all"}
        )
        # A test's download directory goes with the test.
        self.download_to(self._downloads)
        self._recorder.take(self.driver)
        self._recorder.clear()
        self._trap.clear()


def _binary() -> Path:
    for candidate in (CHROMIUM_BINARY, CHROMIUM_LAUNCHER):
        if candidate.exists():
            return candidate
    raise RuntimeError(
        f"Chromium is not installed ({CHROMIUM_BINARY}): run scripts/setup-system.sh"
    )


def _options(profile: Path, downloads: Path, trap: Site) -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(_binary())
    width, height = WINDOW_SIZE
    for flag in (
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--hide-scrollbars",
        "--password-store=basic",
        "--use-mock-keychain",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        # Everything not on loopback goes to the trap, which keeps and refuses it.
        f"--proxy-server=http://127.0.0.1:{trap.port}",
        "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
        *_QUIET_FLAGS,
    ):
        options.add_argument(flag)
    if os.geteuid() == 0:
        # Chromium's sandbox refuses to run as root (a CI container); as any other user
        # it stays on, as a user's browser has it.
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.add_experimental_option(
        "perfLoggingPrefs", {"enableNetwork": True, "enablePage": False}
    )
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
            # After a login form, the password manager offers to save the password and
            # checks it against Google's leak database: both would leave loopback.
            "credentials_enable_service": False,
            "profile.password_manager_enabled": False,
            "profile.password_manager_leak_detection": False,
        },
    )
    return options


@contextmanager
def start_browser(directory: Path) -> Iterator[Browser]:
    """One headless Chromium with its profile, downloads and logs under ``directory``."""
    if not CHROMEDRIVER.exists():
        raise RuntimeError(
            f"chromium-driver is not installed ({CHROMEDRIVER}): run scripts/setup-system.sh"
        )
    profile = directory / "profile"
    downloads = directory / "downloads"
    profile.mkdir(parents=True)
    downloads.mkdir()
    with serve_site() as trap:
        # The driver path is given, so selenium never runs Selenium Manager (which would
        # look for drivers on the network).
        service = Service(str(CHROMEDRIVER), log_output=str(directory / "chromedriver.log"))
        driver = webdriver.Chrome(service=service, options=_options(profile, downloads, trap))
        try:
            driver.set_page_load_timeout(WAIT_TIMEOUT)
            browser = Browser(driver, trap, downloads)
            browser.reset()
            yield browser
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
