"""The admin pages (users in ``web.admins`` only; anyone else gets 403): the users with
their mail, quota and devices, and the edits ``popbox user`` makes (add, remove, set a
password, set a quota) through the UserAdmin protocol; and the collector's accounts,
last results and quarantine, read-only.

A user removed, or given a new password, loses every web session at once: whoever
held the old password keeps nothing of it here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from popbox.auth.base import UserRecord
from popbox.auth.entries import parse_size
from popbox.auth.useradmin import UserAdmin
from popbox.errors import AuthError, CollectorError, StoreError
from popbox.store.base import Usage
from popbox.web.context import admin_page, render, web_context
from popbox.web.csrf import read_form
from popbox.web.login import MAX_PASSWORD_LENGTH
from popbox.web.sessions import Session

__all__ = ["MAX_USERS_LISTED", "routes"]

log = logging.getLogger("popbox.web")

# Users on one page, each costing a usage and a devices lookup in the store: past
# this many, `popbox user list` is the tool (and the page says so).
MAX_USERS_LISTED: Final = 500
# Store lookups in flight while the page is built: enough to hide latency, few
# enough not to crowd the POP3 sessions out of a PostgreSQL pool.
STORE_CONCURRENCY: Final = 8
TEXT_READ_ONLY: Final = "This user database cannot be edited from here."


@dataclass(frozen=True, slots=True)
class UserRow:
    name: str
    usage: Usage | None
    quota_messages: int
    quota_octets: int
    devices: int | None


async def _rows(request: Request, records: list[UserRecord]) -> list[UserRow]:
    context = web_context(request)
    quota = context.config.quota
    gate = asyncio.Semaphore(STORE_CONCURRENCY)

    async def row(record: UserRecord) -> UserRow:
        usage: Usage | None
        devices: int | None
        async with gate:
            try:
                usage = await context.store.usage(record.name)
                devices = len({d.device for d in await context.store.devices(record.name)})
            except StoreError as exc:
                log.warning("web admin: mailbox of %s unavailable: %s", record.name, exc)
                usage, devices = None, None
        return UserRow(
            name=record.name,
            usage=usage,
            # A per-user 0 is "no limit" and overrides the default, as in Dovecot.
            quota_messages=quota.messages
            if record.quota_messages is None
            else record.quota_messages,
            quota_octets=quota.octets if record.quota_octets is None else record.quota_octets,
            devices=devices,
        )

    return list(await asyncio.gather(*(row(record) for record in records)))


async def _users_page(
    request: Request,
    session: Session,
    *,
    notice: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    admin = web_context(request).useradmin
    rows: list[UserRow] = []
    more = 0
    if admin is None:
        error = error or TEXT_READ_ONLY
    else:
        try:
            records = await admin.list_users()
        except AuthError as exc:
            log.error("web admin: cannot list users: %s", exc, exc_info=exc)
            records, error, status_code = [], f"The user database cannot be read: {exc}", 503
        more = max(len(records) - MAX_USERS_LISTED, 0)
        rows = await _rows(request, records[:MAX_USERS_LISTED])
    return render(
        request,
        "admin_users.html",
        {
            "rows": rows,
            "more": more,
            "editable": admin is not None,
            "notice": notice,
            "error": error,
        },
        session=session,
        status_code=status_code,
    )


@admin_page
async def users(request: Request, session: Session) -> Response:
    """GET /admin/users: every user with mail, quota and devices, and the edit forms."""
    return await _users_page(request, session)


def _quota_fields(form: FormData) -> tuple[int | None, int | None]:
    """The quota fields of a form: blank is None (the default), else a count and a
    size (ValueError with the reason)."""
    messages_text = str(form.get("quota_messages", "")).strip()
    size_text = str(form.get("quota_size", "")).strip()
    if messages_text and not (messages_text.isdigit() and len(messages_text) <= 12):
        raise ValueError(f"{messages_text!r} is not a number of messages")
    messages = int(messages_text) if messages_text else None
    octets = parse_size(size_text) if size_text else None
    return messages, octets


def _name(form: FormData) -> str:
    name = str(form.get("username", "")).strip()
    if not name:
        raise ValueError("no user name given")
    return name


def _password(form: FormData) -> str:
    password = str(form.get("password", ""))
    if not password:
        raise ValueError("the password is empty")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"a password is at most {MAX_PASSWORD_LENGTH} characters")
    return password


Edit = Callable[[UserAdmin, FormData], Awaitable[str]]


async def _edit(request: Request, session: Session, edit: Edit) -> Response:
    """Run one edit from a posted form: the users page with its notice or its error."""
    form = await read_form(request, session)
    admin = web_context(request).useradmin
    if admin is None:
        raise HTTPException(403, TEXT_READ_ONLY)
    try:
        notice = await edit(admin, form)
    except (ValueError, AuthError) as exc:
        return await _users_page(request, session, error=str(exc), status_code=400)
    log.info("web admin=%s: %s", session.user, notice)
    return await _users_page(request, session, notice=notice)


@admin_page
async def add_user(request: Request, session: Session) -> Response:
    """POST /admin/users/add: a new user with a password and an optional quota."""
    scheme = web_context(request).config.auth.default_scheme

    async def add(admin: UserAdmin, form: FormData) -> str:
        name, password = _name(form), _password(form)
        messages, octets = _quota_fields(form)
        await admin.add_user(
            name, password, scheme=scheme, quota_messages=messages, quota_octets=octets
        )
        return f"Added {name}."

    return await _edit(request, session, add)


@admin_page
async def remove_user(request: Request, session: Session) -> Response:
    """POST /admin/users/remove: the user goes (their mail stays), sessions too."""
    sessions = web_context(request).sessions

    async def remove(admin: UserAdmin, form: FormData) -> str:
        name = _name(form)
        if form.get("confirm") != "yes":
            raise ValueError("tick the box to confirm the removal")
        if name == session.user:
            raise ValueError("you cannot remove yourself while logged in as yourself")
        await admin.delete_user(name)
        sessions.end_user(name)
        return f"Removed {name}; their mail stays."

    return await _edit(request, session, remove)


@admin_page
async def set_password(request: Request, session: Session) -> Response:
    """POST /admin/users/password: a new password; the user's sessions end."""
    context = web_context(request)

    async def change(admin: UserAdmin, form: FormData) -> str:
        name, password = _name(form), _password(form)
        await admin.set_password(name, password, scheme=context.config.auth.default_scheme)
        if name != session.user:
            context.sessions.end_user(name)
        return f"Set the password of {name}."

    return await _edit(request, session, change)


@admin_page
async def set_quota(request: Request, session: Session) -> Response:
    """POST /admin/users/quota: a quota (blank: the default; 0: no limit)."""

    async def change(admin: UserAdmin, form: FormData) -> str:
        name = _name(form)
        messages, octets = _quota_fields(form)
        await admin.set_quota(name, messages, octets)
        return f"Set the quota of {name}."

    return await _edit(request, session, change)


@admin_page
async def collector(request: Request, session: Session) -> Response:
    """GET /admin/collector: the collector's accounts, last results and quarantine."""
    view = web_context(request).collector
    accounts = []
    error = None
    status_code = 200
    if view is not None:
        try:
            accounts = await view.accounts()
        except CollectorError as exc:
            log.error("web admin: collector state unreadable: %s", exc, exc_info=exc)
            error, status_code = f"The collector's state cannot be read: {exc}", 503
    return render(
        request,
        "admin_collector.html",
        {
            "configured": view is not None,
            "accounts": accounts,
            "error": error,
            "state_db": str(view.state_db) if view else "",
            "quarantine_dir": str(view.quarantine_dir) if view else "",
        },
        session=session,
        status_code=status_code,
    )


routes: Final = [
    Route("/admin/users", users, methods=["GET"]),
    Route("/admin/users/add", add_user, methods=["POST"]),
    Route("/admin/users/remove", remove_user, methods=["POST"]),
    Route("/admin/users/password", set_password, methods=["POST"]),
    Route("/admin/users/quota", set_quota, methods=["POST"]),
    Route("/admin/collector", collector, methods=["GET"]),
]
