"""What every page of the web app reaches: the parts it was built on, the session table,
the templates, and the guards that turn a request into a logged-in user or a refusal.

The parts (archive, user database, mail store, user admin, the collector's state) are
built by the composition root and handed to ``create_app``; pages find them on
``request.app.state.web``. A page is written as ``async def page(request, session)``
under ``user_page`` or ``admin_page``: the guard has found the session from its cookie
before the page runs, so no page can forget to look.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import jinja2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from popbox.archive.base import Archive
from popbox.auth.base import PassDB
from popbox.auth.useradmin import UserAdmin
from popbox.config import Config
from popbox.net.limits import AuthPenalty
from popbox.store.base import MailStore
from popbox.web.collector_view import CollectorView
from popbox.web.sessions import COOKIE_NAME, Session, SessionTable

__all__ = [
    "BASE_CSP",
    "MAX_PARSING",
    "TEMPLATES_DIR",
    "Page",
    "WebContext",
    "admin_page",
    "human_size",
    "human_time",
    "render",
    "user_page",
    "web_context",
]

TEMPLATES_DIR: Final = Path(__file__).parent / "templates"
# Nothing but our own stylesheet and images, no scripts at all, forms only to us, in
# no frame, and no <base> to redirect relative links: the page needs nothing else.
BASE_CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

# Messages parsed at once for the message pages: each may hold a message of up to
# render.MAX_VIEW_OCTETS a few times over, on a host whose cores the POP3 server shares.
MAX_PARSING: Final = 4

Page: TypeAlias = Callable[[Request, Session], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class WebContext:
    """The parts one web app serves from (one per ``create_app``)."""

    config: Config
    archive: Archive
    passdb: PassDB
    store: MailStore
    useradmin: UserAdmin | None
    collector: CollectorView | None
    sessions: SessionTable
    penalty: AuthPenalty
    templates: Jinja2Templates
    parsing: asyncio.Semaphore
    """Messages parsed at once (MAX_PARSING)."""


def web_context(request: Request) -> WebContext:
    context: WebContext = request.app.state.web
    return context


def human_size(octets: int) -> str:
    """Octets as people read them: ``512 B``, ``1.5 KiB``, ``3.2 MiB``."""
    size = float(octets)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{octets} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{octets} B"


def human_time(stamp: float | None) -> str:
    """A moment as ``2026-12-07 16:53`` (UTC: the server's clock, no time zone guesses)."""
    if stamp is None or stamp <= 0:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(stamp))


def make_templates() -> Jinja2Templates:
    """The page templates, autoescaped everywhere (every value is text until proven
    otherwise; markup is built only in render.py, from escaped parts)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["size"] = human_size
    env.filters["when"] = human_time
    return Jinja2Templates(env=env)


def render(
    request: Request,
    name: str,
    values: Mapping[str, Any],
    *,
    session: Session | None,
    status_code: int = 200,
) -> Response:
    """Render template ``name`` with ``values`` and what every page shows (the user,
    whether they are an admin, the CSRF token for its forms)."""
    context = web_context(request)
    full = {
        "session": session,
        "csrf": session.csrf if session else "",
        "error": None,
        "notice": None,
    }
    full.update(values)
    return context.templates.TemplateResponse(request, name, full, status_code=status_code)


def _session_of(request: Request) -> Session | None:
    return web_context(request).sessions.find(request.cookies.get(COOKIE_NAME))


def user_page(page: Page) -> Callable[[Request], Awaitable[Response]]:
    """Run ``page`` for a logged-in user; send anyone else to the login page (a GET)
    or refuse them (403, anything else: a form posted without a session)."""

    @functools.wraps(page)
    async def guarded(request: Request) -> Response:
        session = _session_of(request)
        if session is None:
            if request.method in ("GET", "HEAD"):
                return RedirectResponse("/login", status_code=303)
            raise HTTPException(403, "Your session has ended; log in again.")
        return await page(request, session)

    return guarded


def admin_page(page: Page) -> Callable[[Request], Awaitable[Response]]:
    """As ``user_page``, and 403 for a user who is not in ``web.admins``."""

    async def admins_only(request: Request, session: Session) -> Response:
        if not session.admin:
            raise HTTPException(403, "This page is for administrators.")
        return await page(request, session)

    functools.update_wrapper(admins_only, page)
    return user_page(admins_only)
