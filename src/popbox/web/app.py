"""The web page's ASGI application and the uvicorn server that runs it.

``create_app`` builds the Starlette app from parts the composition root made (the
archive, the user database, the mail store, the user admin, the collector's state);
``serve_web`` serves it with uvicorn on ``web.listen`` (or on a socket bound before),
until its task is cancelled.

Every response passes through two layers of our own: ``SecurityHeaders`` gives each a
strict Content-Security-Policy and the headers that keep the page out of frames,
referrers and content sniffing (a page that needs more, the message frame, sets its
own), and ``BodyLimit`` refuses request bodies past ``MAX_FORM_BODY`` before anything
parses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from popbox.archive.base import Archive
from popbox.auth.base import PassDB
from popbox.auth.useradmin import UserAdmin
from popbox.config import Config
from popbox.net.limits import AuthPenalty
from popbox.net.service import bind_addresses
from popbox.store.base import MailStore
from popbox.web import pages_admin, pages_user
from popbox.web.collector_view import CollectorView
from popbox.web.context import (
    BASE_CSP,
    MAX_PARSING,
    WebContext,
    make_templates,
    render,
    web_context,
)
from popbox.web.login import login_page, login_submit, logout
from popbox.web.sessions import COOKIE_NAME, MAX_SESSIONS, SessionTable

__all__ = [
    "BASE_CSP",
    "MAX_FORM_BODY",
    "bind_web",
    "create_app",
    "serve_web",
]

log = logging.getLogger("popbox.web")

STATIC_DIR: Final = Path(__file__).parent / "static"
BASE_HEADERS: Final = (
    ("content-security-policy", BASE_CSP),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    # Mail is private: no shared cache and no back-button copy after logout keeps it.
    ("cache-control", "no-store"),
    ("cross-origin-opener-policy", "same-origin"),
)
# The largest form is a few short fields; 64 KiB is room and to spare, and a body
# past it is refused before anything reads it.
MAX_FORM_BODY: Final = 64 * 1024
# Requests in flight get this long to finish when the server is stopped.
SHUTDOWN_GRACE: Final = 5
# Connections served at once; past this uvicorn answers 503 at once. Dovecot's
# default_client_limit (1,000) for the same reason: each costs memory and a task.
MAX_CONNECTIONS: Final = 1000
# X-Forwarded-For is believed only from a reverse proxy on this host (the HTTPS
# front web.secure_cookies asks for): the address the login penalty counts.
TRUSTED_FORWARDERS: Final = ("127.0.0.1", "::1")


class SecurityHeaders:
    """Adds the base security headers to every response that has not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in BASE_HEADERS:
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_secured)


class BodyLimit:
    """Refuses request bodies past ``limit`` octets (413): by their Content-Length
    before the app runs, and by counting for a body sent without one."""

    def __init__(self, app: ASGIApp, limit: int = MAX_FORM_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                response = PlainTextResponse("Request body too large.", status_code=413)
                await response(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, "Request body too large.")
            return message

        await self.app(scope, counted, send)


async def _error_page(request: Request, exc: Exception) -> Response:
    """An HTTP error as a page of ours (its text is escaped like any other)."""
    if isinstance(exc, HTTPException):
        status, detail = exc.status_code, exc.detail
    else:
        status, detail = 500, "Something went wrong on our side."
    if status == 404:
        detail = "There is nothing here."
    session = web_context(request).sessions.find(request.cookies.get(COOKIE_NAME))
    return render(
        request,
        "error.html",
        {"status": status, "detail": detail},
        session=session,
        status_code=status,
    )


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("web %s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return await _error_page(request, exc)


async def _home(request: Request) -> Response:
    return RedirectResponse("/search", status_code=303)


def create_app(
    config: Config,
    *,
    archive: Archive,
    passdb: PassDB,
    store: MailStore,
    useradmin: UserAdmin | None,
    collector: CollectorView | None = None,
    penalty: AuthPenalty | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_sessions: int = MAX_SESSIONS,
) -> Starlette:
    """The web page on these parts; the caller keeps them and closes them after the
    app has stopped.

    ``useradmin``: None hides the admin pages' edits (a user database popbox cannot
    write). ``collector``: the collector's state (web.collector_view.collector_view
    of ``config.fetch``), None when there is no collector. ``penalty``: the per-IP
    login penalty to share with the POP3 listeners (one guesser, one count); by
    default the page keeps its own with ``limits.auth_penalty_max``. ``clock``: what
    session expiry counts with (tests step it).
    """
    context = WebContext(
        config=config,
        archive=archive,
        passdb=passdb,
        store=store,
        useradmin=useradmin,
        collector=collector,
        sessions=SessionTable(
            idle=config.web.session_idle,
            lifetime=config.web.session_lifetime,
            max_sessions=max_sessions,
            clock=clock,
        ),
        penalty=penalty if penalty is not None else AuthPenalty(config.limits.auth_penalty_max),
        templates=make_templates(),
        parsing=asyncio.Semaphore(MAX_PARSING),
    )
    routes: list[BaseRoute] = [
        Route("/", _home, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        *pages_user.routes,
        *pages_admin.routes,
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _error_page, Exception: _server_error},
    )
    app.state.web = context
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    return app


def bind_web(config: Config) -> socket.socket:
    """Bind ``web.listen`` (ConfigError naming it if that fails): bind before dropping
    privileges, then hand the socket to ``serve_web``."""
    return bind_addresses([config.web.listen])[0]


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process that runs it owns
    the signals, and stops the page by cancelling its task."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_web(config: Config, app: ASGIApp, *, sock: socket.socket | None = None) -> None:
    """Serve ``app`` on ``sock`` (default: ``web.listen``, bound here) until cancelled;
    then stop accepting, let requests in flight finish (``SHUTDOWN_GRACE``) and close
    the socket."""
    if sock is None:
        sock = bind_web(config)
    server = _Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            limit_concurrency=MAX_CONNECTIONS,
            proxy_headers=True,
            forwarded_allow_ips=list(TRUSTED_FORWARDERS),
        )
    )
    host, port = sock.getsockname()[:2]
    log.info("web page on http://%s:%d/", host if ":" not in host else f"[{host}]", port)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await task
        raise
    finally:
        sock.close()
