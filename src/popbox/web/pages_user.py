"""The pages of a logged-in user: search, a message, its frame, attachments and raw
download, the export of a search, and the user's devices.

Every URL that names an archived message takes its entry id and looks it up with the
session's user only (``Archive.entry(user, id)``): another user's id answers 404,
exactly as an id that does not exist, and nothing on any page can name another user.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from popbox.archive.base import DEFAULT_PAGE, Entry, MatchAll, Query
from popbox.archive.query import parse_query
from popbox.errors import ArchiveError, InvalidQuery, MaildropInUse, NoSuchEntry, StoreError
from popbox.store.base import Usage
from popbox.web.context import BASE_CSP, render, user_page, web_context
from popbox.web.csrf import read_form
from popbox.web.export import EXPORT_NAME, mbox_stream
from popbox.web.render import (
    MAX_VIEW_OCTETS,
    attachment_headers,
    find_attachment,
    frame_document,
    snippet_markup,
    view_message,
)
from popbox.web.sessions import Session

__all__ = ["FRAME_CSP", "MAX_PAGE_NUMBER", "MAX_QUERY_CHARS", "routes"]

log = logging.getLogger("popbox.web")

T = TypeVar("T")

# A query is typed by a person: 1,000 characters is a paragraph of terms; more is
# only work for the parser and the index.
MAX_QUERY_CHARS: Final = 1000
# Results are paged by DEFAULT_PAGE; past 200 pages (10,000 results) refine the query
# or export: a deep OFFSET costs the index more than anyone reads.
MAX_PAGE_NUMBER: Final = 200
# The message frame: only its own inline styles and data: images, nothing that runs,
# submits or frames, and a sandbox even if the iframe's own attribute were lost.
FRAME_CSP: Final = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'none'; "
    "frame-ancestors 'self'; base-uri 'none'; sandbox"
)
# The message page frames the HTML part from this site, and nothing else.
MESSAGE_CSP: Final = BASE_CSP + "; frame-src 'self'"
TEXT_ARCHIVE_DOWN: Final = "The archive cannot be read just now; try again in a moment."
# The query words, for the help box beside the search field.
QUERY_HELP: Final = (
    ("word", "the word anywhere: headers, text, attachment names"),
    ('"two words"', "the phrase, in that order"),
    ("from:alice", "in From"),
    ("to:bob", "in To or Cc"),
    ("subject:report", "in Subject"),
    ("body:invoice", "in the text"),
    ("filename:pdf", "in an attachment's name"),
    ("has:attachment", "with at least one attachment"),
    ("before:2026-01-31", "sent before that day (UTC)"),
    ("after:2026-01-01", "sent on or after that day"),
    ("larger:5M  smaller:100k", "by size (k, M, G)"),
    ("invoi*", "every word it begins"),
    ("a OR b", "either"),
    ("-word  NOT word", "without"),
    ("( )", "group"),
)


def _query_text(request: Request) -> str:
    text = request.query_params.get("q", "").strip()
    if len(text) > MAX_QUERY_CHARS:
        raise HTTPException(400, f"A search is at most {MAX_QUERY_CHARS} characters.")
    return text


def _parse(text: str) -> Query:
    return parse_query(text) if text else MatchAll()


def _page_number(request: Request) -> int:
    text = request.query_params.get("page", "1")
    number = int(text) if text.isdigit() and len(text) < 6 else 1
    return min(max(number, 1), MAX_PAGE_NUMBER)


async def _mailbox_summary(request: Request, user: str) -> tuple[Usage | None, list[str]]:
    """The user's mailbox as the store has it now (None, [] if it cannot say)."""
    store = web_context(request).store
    try:
        return await store.usage(user), await store.folders(user)
    except StoreError as exc:
        log.warning("web user=%s mailbox summary unavailable: %s", user, exc)
        return None, []


@user_page
async def search(request: Request, session: Session) -> Response:
    """GET /search?q=&page=: the user's archive, newest first, and their mailbox."""
    archive = web_context(request).archive
    text = _query_text(request)
    page = _page_number(request)
    usage, folders = await _mailbox_summary(request, session.user)
    values: dict[str, object] = {
        "q": text,
        "page": page,
        "hits": [],
        "total": 0,
        "pages": 0,
        "usage": usage,
        "folders": folders,
        "help": QUERY_HELP,
    }
    try:
        # The backend may find fault with a query the parser took (a term its index
        # cannot search): the same friendly error either way.
        result = await archive.search(
            session.user, _parse(text), limit=DEFAULT_PAGE, offset=(page - 1) * DEFAULT_PAGE
        )
    except InvalidQuery as exc:
        values["error"] = f"That search cannot be read: {exc}"
        return render(request, "search.html", values, session=session, status_code=400)
    except ArchiveError as exc:
        log.error("web user=%s search failed: %s", session.user, exc, exc_info=exc)
        values["error"] = TEXT_ARCHIVE_DOWN
        return render(request, "search.html", values, session=session, status_code=503)
    values.update(
        hits=[(hit.entry, snippet_markup(hit.snippet)) for hit in result.hits],
        total=result.total,
        pages=min(-(-result.total // DEFAULT_PAGE), MAX_PAGE_NUMBER),
    )
    return render(request, "search.html", values, session=session)


async def _entry(request: Request, session: Session) -> Entry:
    """The entry the URL names, looked up with the session's user only (404 else)."""
    entry_id = request.path_params["entry_id"]
    try:
        return await web_context(request).archive.entry(session.user, entry_id)
    except NoSuchEntry as exc:
        raise HTTPException(404) from exc
    except ArchiveError as exc:
        log.error("web user=%s entry %s: %s", session.user, entry_id, exc, exc_info=exc)
        raise HTTPException(503, TEXT_ARCHIVE_DOWN) from exc


async def _octets(request: Request, session: Session, entry: Entry) -> bytes:
    """The entry's message, whole (only for one no bigger than MAX_VIEW_OCTETS)."""
    archive = web_context(request).archive
    chunks: list[bytes] = []
    seen = 0
    try:
        async for chunk in archive.read(session.user, entry.id):
            seen += len(chunk)
            if seen > MAX_VIEW_OCTETS:
                raise HTTPException(413, "This message is too big to show; download it.")
            chunks.append(chunk)
    except NoSuchEntry as exc:
        raise HTTPException(404) from exc
    except ArchiveError as exc:
        log.error("web user=%s read %d: %s", session.user, entry.id, exc, exc_info=exc)
        raise HTTPException(503, TEXT_ARCHIVE_DOWN) from exc
    return b"".join(chunks)


async def _parsed(request: Request, work: Callable[[bytes], T], data: bytes) -> T:
    """Run a parse of ``data`` on a worker thread, a few at a time: parsing a big
    message takes long enough to stall every other request (and, inside ``popbox
    serve``, the POP3 sessions) if it ran on the event loop, and each holds the
    message in memory a few times over."""
    async with web_context(request).parsing:
        return await asyncio.to_thread(work, data)


@user_page
async def message(request: Request, session: Session) -> Response:
    """GET /message/{id}: headers, text, the HTML part's frame, attachments."""
    entry = await _entry(request, session)
    view = None
    if entry.size <= MAX_VIEW_OCTETS:
        view = await _parsed(request, view_message, await _octets(request, session, entry))
    response = render(
        request,
        "message.html",
        {"entry": entry, "view": view},
        session=session,
    )
    response.headers["content-security-policy"] = MESSAGE_CSP
    return response


@user_page
async def message_frame(request: Request, session: Session) -> Response:
    """GET /message/{id}/html: the sanitised HTML part, for the sandboxed frame only."""
    entry = await _entry(request, session)
    if entry.size > MAX_VIEW_OCTETS:
        raise HTTPException(404)
    document = await _parsed(request, frame_document, await _octets(request, session, entry))
    if document is None:
        raise HTTPException(404)
    return HTMLResponse(
        document,
        headers={
            "content-security-policy": FRAME_CSP,
            "x-frame-options": "SAMEORIGIN",
            "cross-origin-resource-policy": "same-origin",
        },
    )


@user_page
async def attachment(request: Request, session: Session) -> Response:
    """GET /message/{id}/part/{n}: attachment n, always as a download."""
    entry = await _entry(request, session)
    if entry.size > MAX_VIEW_OCTETS:
        raise HTTPException(413, "This message is too big to take apart; download it whole.")
    index = request.path_params["index"]
    data = await _octets(request, session, entry)
    found = await _parsed(request, lambda octets: find_attachment(octets, index), data)
    if found is None:
        raise HTTPException(404)
    info, payload = found
    return Response(payload, headers=attachment_headers(info))


@user_page
async def raw(request: Request, session: Session) -> Response:
    """GET /message/{id}/raw: the message exactly as archived, as a download."""
    entry = await _entry(request, session)
    stream = web_context(request).archive.read(session.user, entry.id)
    return StreamingResponse(
        stream,
        media_type="message/rfc822",
        headers={
            "content-disposition": f'attachment; filename="message-{entry.id}.eml"',
            "content-length": str(entry.size),
            "content-security-policy": "default-src 'none'; sandbox",
        },
    )


@user_page
async def export(request: Request, session: Session) -> Response:
    """GET /export?q=: every message the search matches, as one mbox file."""
    text = _query_text(request)
    try:
        query = _parse(text)
    except InvalidQuery as exc:
        raise HTTPException(400, f"That search cannot be read: {exc}") from exc
    log.info("web user=%s export q=%r", session.user, text)
    return StreamingResponse(
        mbox_stream(web_context(request).archive, session.user, query),
        media_type="application/mbox",
        headers={
            "content-disposition": f'attachment; filename="{EXPORT_NAME}"',
            "content-security-policy": "default-src 'none'; sandbox",
        },
    )


async def _devices_page(
    request: Request,
    session: Session,
    *,
    notice: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    store = web_context(request).store
    try:
        devices = await store.devices(session.user)
    except StoreError as exc:
        log.warning("web user=%s devices unavailable: %s", session.user, exc)
        devices, error = [], "The mailbox cannot be read just now; try again in a moment."
        status_code = 503
    folders: dict[str, list[object]] = {}
    for device in devices:
        folders.setdefault(device.folder, []).append(device)
    return render(
        request,
        "devices.html",
        {
            "folders": folders,
            "names": sorted({d.device for d in devices}),
            "notice": notice,
            "error": error,
        },
        session=session,
        status_code=status_code,
    )


@user_page
async def devices(request: Request, session: Session) -> Response:
    """GET /devices: every device of every folder of the user's mailbox."""
    return await _devices_page(request, session)


@user_page
async def forget_device(request: Request, session: Session) -> Response:
    """POST /devices/forget: the device stops holding mail back, in every folder."""
    form = await read_form(request, session)
    name = str(form.get("device", ""))
    store = web_context(request).store
    try:
        count = await store.forget_device(session.user, name)
    except MaildropInUse:
        return await _devices_page(
            request,
            session,
            status_code=409,
            error=f"A POP3 session holds one of the folders of {name} now; "
            "try again when it has ended.",
        )
    except StoreError as exc:
        log.warning("web user=%s forget %r failed: %s", session.user, name, exc)
        return await _devices_page(
            request, session, status_code=400, error=f"Cannot forget device {name}: {exc}"
        )
    if not count:
        return await _devices_page(
            request, session, status_code=404, error=f"There is no device {name}."
        )
    log.info("web user=%s forgot device %r in %d folders", session.user, name, count)
    return await _devices_page(
        request, session, notice=f"Forgot device {name} in {count} folder{'s' * (count != 1)}."
    )


routes: Final = [
    Route("/search", search, methods=["GET"]),
    Route("/message/{entry_id:int}", message, methods=["GET"]),
    Route("/message/{entry_id:int}/html", message_frame, methods=["GET"]),
    Route("/message/{entry_id:int}/part/{index:int}", attachment, methods=["GET"]),
    Route("/message/{entry_id:int}/raw", raw, methods=["GET"]),
    Route("/export", export, methods=["GET"]),
    Route("/devices", devices, methods=["GET"]),
    Route("/devices/forget", forget_device, methods=["POST"]),
]
