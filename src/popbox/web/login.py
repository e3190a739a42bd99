"""Logging in to the web page with a mailbox's own credentials, and logging out.

The same path as POP3's: the address's penalty (net.limits.AuthPenalty, Dovecot's
auth_penalty) is served before any credential work, the password is checked by
net.login.authenticate (one failure path, the failure delay, app passwords as for
POP3), and the user database's login restrictions (allow_nets, nologin, proxy) are
applied with the browser's address. Whatever can be guessed is refused alike: an
unknown user, a wrong password, a name that can be no user and a restricted account
all get the same page, after the same delay, counted against the address; the page
never repeats the name it was given.

A login starts a new session under a new token and drops the one the browser had, so
a token planted before the login is worth nothing after it (no fixation).
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from typing import Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from popbox.auth.names import is_valid_username
from popbox.auth.restrictions import login_refusal
from popbox.net.login import TEXT_AUTH_FAILED, authenticate, fail_slowly
from popbox.proto.events import LoginRequest
from popbox.proto.replies import CODE_AUTH
from popbox.web.context import render, web_context
from popbox.web.csrf import LOGIN_COOKIE, read_form, read_login_form
from popbox.web.sessions import COOKIE_NAME, MAX_TOKEN_LENGTH, new_token

__all__ = ["MAX_PASSWORD_LENGTH", "login_page", "login_submit", "logout"]

log = logging.getLogger("popbox.web")

# Dovecot refuses passwords past 1 KiB too; a longer one is only work for the hasher.
MAX_PASSWORD_LENGTH: Final = 1024
# The login cookie's life: a login form left open longer is simply shown again.
LOGIN_COOKIE_AGE: Final = 3600
# The name checked for a name that can be no user: no user has it (auth.names), so
# the check runs, and fails, exactly as for an unknown user (net.broker does the same).
_NO_USER: Final = ""


def client_ip(request: Request) -> str:
    """The browser's address (the proxy's X-Forwarded-For when uvicorn trusts it)."""
    return request.client.host if request.client is not None else "unknown"


def _set_cookie(request: Request, response: Response, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=web_context(request).config.web.secure_cookies,
    )


def _drop_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(
        name,
        path="/",
        httponly=True,
        samesite="strict",
        secure=web_context(request).config.web.secure_cookies,
    )


def _login_form(request: Request, *, error: str | None, status_code: int = 200) -> Response:
    """The login form, with the double-submit token in its hidden field and cookie."""
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not token or len(token) > MAX_TOKEN_LENGTH:
        token = new_token()
    response = render(
        request,
        "login.html",
        {"login_token": token, "error": error},
        session=None,
        status_code=status_code,
    )
    _set_cookie(request, response, LOGIN_COOKIE, token, LOGIN_COOKIE_AGE)
    return response


async def login_page(request: Request) -> Response:
    """GET /login: the form (a browser with a live session goes straight to search)."""
    context = web_context(request)
    if context.sessions.find(request.cookies.get(COOKIE_NAME)) is not None:
        return RedirectResponse("/search", status_code=303)
    return _login_form(request, error=None)


async def login_submit(request: Request) -> Response:
    """POST /login: check the credentials; a session, or the form again with one text."""
    context = web_context(request)
    form = await read_login_form(request)
    ip = client_ip(request)
    name = unicodedata.normalize("NFC", str(form.get("username", "")))
    password = str(form.get("password", ""))
    # Before the check, so a penalised address costs no hashing either.
    wait = context.penalty.delay(ip)
    if wait > 0:
        await asyncio.sleep(wait)
    limits = context.config.limits
    wanted = name if is_valid_username(name) and len(password) <= MAX_PASSWORD_LENGTH else _NO_USER
    outcome = await authenticate(
        context.passdb,
        LoginRequest(wanted, password[:MAX_PASSWORD_LENGTH], "WEB"),
        failure_delay=limits.auth_failure_delay,
        session_id="web",
    )
    record = outcome.record
    if record is None:
        if outcome.code == CODE_AUTH:
            context.penalty.failed(ip)
            log.info("web login failed from %s", ip)
            return _login_form(request, error=TEXT_AUTH_FAILED, status_code=401)
        return _login_form(request, error=outcome.text, status_code=503)
    refusal = login_refusal(record.extra, ip=ip, real_ip=ip)
    if refusal is not None:
        # The password was right, but this account may not log in from here (or at
        # all): said as a wrong password is, so the page tells a guesser nothing.
        log.info("web login=%s refused by the %s field", record.name, refusal.field)
        await fail_slowly(limits.auth_failure_delay)
        context.penalty.failed(ip)
        return _login_form(request, error=TEXT_AUTH_FAILED, status_code=401)
    context.penalty.succeeded(ip)
    old = request.cookies.get(COOKIE_NAME)
    if old:
        context.sessions.end(old)
    session = context.sessions.start(record.name, admin=record.name in context.config.web.admins)
    log.info(
        "web login=%s from %s%s",
        record.name,
        ip,
        f" with app password {record.credential}" if record.credential else "",
    )
    response = RedirectResponse("/search", status_code=303)
    lifetime = int(context.config.web.session_lifetime)
    _set_cookie(request, response, COOKIE_NAME, session.token, lifetime)
    _drop_cookie(request, response, LOGIN_COOKIE)
    return response


async def logout(request: Request) -> Response:
    """POST /logout (with the session's CSRF token): the session is gone at once."""
    context = web_context(request)
    token = request.cookies.get(COOKIE_NAME)
    session = context.sessions.find(token)
    if session is not None:
        await read_form(request, session)
        context.sessions.end(session.token)
        log.info("web logout=%s", session.user)
    response = RedirectResponse("/login", status_code=303)
    _drop_cookie(request, response, COOKIE_NAME)
    return response
