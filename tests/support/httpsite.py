"""Small HTTP sites on loopback that keep every request they get: the other origins a
browser test needs (a tracker an e-mail points at, an attacker's page, the trap that
stands for the whole outside world).

``serve_site()`` starts a ``Site`` on 127.0.0.1 in a thread and yields it; pages are
added with ``Site.page`` and everything that arrives, known path or not, is kept in
``Site.requests`` (a request the site has no page for gets a 404, and is still kept).
A proxy request (an absolute URL, or CONNECT for HTTPS) is kept and refused, so a
``Site`` given to Chromium as its proxy records each attempt to leave loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final
from urllib.parse import urlsplit

__all__ = ["Page", "SeenRequest", "Site", "serve_site"]

# A test page or a form post is a few KiB; anything near this is a bug in the test.
MAX_REQUEST_BODY: Final = 1 << 20
# Joining the server thread: it answers in microseconds, so this only bounds a hang.
STOP_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Page:
    """What the site answers for one path."""

    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as it arrived: ``target`` is the request line's target (a path, an
    absolute URL for a proxy request, ``host:port`` for CONNECT)."""

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def host(self) -> str:
        """The host a proxy request was for ("" for a request to the site itself)."""
        if "://" in self.target:
            return urlsplit(self.target).hostname or ""
        if self.method == "CONNECT":
            return self.target.rsplit(":", 1)[0].strip("[]").lower()
        return ""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path if "://" in self.target else self.target.split("?")[0]


class Site:
    """The pages of one loopback origin and what it was asked for."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self._server = server
        self._pages: dict[str, Page] = {}
        self._requests: list[SeenRequest] = []
        # The server thread appends while the test reads: one lock for both.
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    def page(self, path: str, page: Page | str) -> str:
        """Serve ``page`` (HTML text, or a full ``Page``) at ``path``; returns its URL."""
        with self._lock:
            self._pages[path] = page if isinstance(page, Page) else Page(page.encode())
        return self.url(path)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[SeenRequest]:
        return [request for request in self.requests if request.path == path]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _answer(self, request: SeenRequest) -> Page:
        with self._lock:
            self._requests.append(request)
            page = self._pages.get(request.path) if request.target.startswith("/") else None
        if page is None:
            return Page(b"not here\n", "text/plain; charset=utf-8", 404)
        return page


def _handler(site_ref: list[Site]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0 with Connection: close, so no idle keep-alive thread outlives a test.
        protocol_version = "HTTP/1.0"

        def _handle(self) -> None:
            length = min(int(self.headers.get("Content-Length") or 0), MAX_REQUEST_BODY)
            body = self.rfile.read(length) if length else b""
            seen = SeenRequest(self.command, self.path, dict(self.headers.items()), body)
            page = site_ref[0]._answer(seen)
            self.send_response(page.status)
            self.send_header("Content-Type", page.content_type)
            self.send_header("Content-Length", str(len(page.body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in page.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(page.body)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = _handle

        def do_CONNECT(self) -> None:
            site_ref[0]._answer(SeenRequest("CONNECT", self.path, dict(self.headers.items()), b""))
            self.send_error(403, "loopback only")

        def log_message(self, format: str, *args: object) -> None:
            # pytest shows stderr of failing tests; a line per image request is noise.
            pass

    return Handler


@contextmanager
def serve_site() -> Iterator[Site]:
    """A ``Site`` listening on 127.0.0.1 (a free port) until the block ends."""
    site_ref: list[Site] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site_ref))
    server.daemon_threads = True
    site = Site(server)
    site_ref.append(site)
    thread = threading.Thread(target=server.serve_forever, name=f"site-{site.port}", daemon=True)
    thread.start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
        thread.join(STOP_TIMEOUT)
