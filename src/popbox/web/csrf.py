"""Cross-site request forgery defences: every POST carries the session's token, and comes
from this site.

Two lines, as OWASP's cheat sheet has them. The first is the synchronizer token: each
session has a random token, every form carries it in the hidden ``csrf`` field, and
a POST without it, or with another, is refused with 403. The second is the browser's
own word (Fetch Metadata's ``Sec-Fetch-Site``, ``Origin``, ``Referer``): a request it
says came from another site is refused too. SameSite=Strict on the session cookie is
a third line the browser keeps.

The login form has no session yet: its token is a double-submit one, a random
``popbox_login`` cookie (SameSite=Strict) that the form repeats, so another site
cannot log a visitor in under the attacker's name.

Forms are small: the body is bounded before it is parsed (``MAX_FORM_BODY`` in
app.py), and so are the fields and their number here.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

from popbox.web.sessions import MAX_TOKEN_LENGTH, Session, tokens_match

__all__ = [
    "CSRF_FIELD",
    "LOGIN_COOKIE",
    "MAX_FORM_FIELDS",
    "MAX_FORM_PART",
    "check_origin",
    "read_form",
    "read_login_form",
]

CSRF_FIELD: Final = "csrf"
LOGIN_COOKIE: Final = "popbox_login"
# The largest form (add a user) has five fields; a few more leave room, not more.
MAX_FORM_FIELDS: Final = 16
# A field is a name, a password, a quota: 4 KiB is far past any of them.
MAX_FORM_PART: Final = 4096
TEXT_FORGED: Final = "This form was not sent from this page; reload the page and try again."


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_origin(request: Request) -> None:
    """403 when the browser says the request came from another site.

    ``Sec-Fetch-Site`` (Fetch Metadata, sent by every current browser) is the clear
    word: ``cross-site`` or ``same-site`` (a sibling host) is refused. ``Origin``
    naming another origin is refused too. An ``Origin`` of ``null`` says nothing:
    our own forms send it, because every page is served with Referrer-Policy
    no-referrer. A client that sends neither (a command-line one) passes here; the
    token is the line that always holds.
    """
    own = f"{request.url.scheme}://{request.url.netloc}".lower()
    if request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        raise HTTPException(403, TEXT_FORGED)
    origin = request.headers.get("origin")
    if origin is not None and origin != "null" and _origin_of(origin) != own:
        raise HTTPException(403, TEXT_FORGED)
    referer = request.headers.get("referer")
    if referer is not None and _origin_of(referer) != own:
        raise HTTPException(403, TEXT_FORGED)


async def _bounded_form(request: Request) -> FormData:
    return await request.form(max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_PART)


async def read_form(request: Request, session: Session) -> FormData:
    """The posted form, once its origin and its CSRF token are checked (403 if not)."""
    check_origin(request)
    form = await _bounded_form(request)
    given = form.get(CSRF_FIELD)
    if not isinstance(given, str) or not tokens_match(given, session.csrf):
        raise HTTPException(403, TEXT_FORGED)
    return form


async def read_login_form(request: Request) -> FormData:
    """The login form, once its origin and its double-submit token are checked."""
    check_origin(request)
    form = await _bounded_form(request)
    given = form.get(CSRF_FIELD)
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if (
        not isinstance(given, str)
        or not expected
        or len(expected) > MAX_TOKEN_LENGTH
        or not tokens_match(given, expected)
    ):
        raise HTTPException(403, TEXT_FORGED)
    return form
