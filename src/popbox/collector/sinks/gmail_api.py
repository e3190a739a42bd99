"""The Gmail sink's side of the Gmail API: labels, the look-up, and the import uploads.

Every request carries the Bearer token (refreshed once when Gmail refuses it) and is
judged by Google's error answer:

- 429, 403 ``rateLimitExceeded``/``userRateLimitExceeded``, 5xx and broken
  connections are retried with exponential backoff and jitter (Retry-After honoured)
  until the delivery's deadline, then TemporarySinkError.
- A refusal of the mailbox, not of the message, is SinkUnavailable: 401 after one
  token refresh, any other 403 (missing scopes, a domain policy, Gmail not enabled),
  labels that cannot be listed or created, no access token at all. Every later
  message would meet the same answer, so the poll engine ends the run and counts no
  message as failed. OAuthLoginRequired from the token provider passes through.
- 400 and 413 on the import quarantine the message (PermanentSinkError).

Messages up to the simple-upload size go in one multipart/related request; bigger ones
through the resumable protocol, which after a broken upload asks the server how much
arrived and sends the rest. Imports are paced to ``imports_per_second``. The access
token never reaches a log or an error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote

import httpx

from popbox.collector.config_common import GOOGLE_GMAIL_API_SCOPES
from popbox.collector.sinks.http_retry import backoff_delay, retry_after_seconds
from popbox.collector.tokens import TokenProvider
from popbox.errors import (
    OAuthLoginRequired,
    PermanentSinkError,
    PopboxError,
    SinkUnavailable,
    TemporarySinkError,
)

if TYPE_CHECKING:
    from popbox.collector.config import GmailSinkSettings

__all__ = ["BACKOFF_INITIAL", "SYSTEM_LABELS", "GmailClient", "Identity"]

log = logging.getLogger(__name__)

# Gmail's system labels a fetched message may carry. DRAFT cannot be imported and CHAT
# is Gmail's own (the settings refuse both); SENT, SPAM and TRASH are allowed (a
# migration may want them).
SYSTEM_LABELS: Final = frozenset(
    {
        "INBOX",
        "UNREAD",
        "STARRED",
        "IMPORTANT",
        "SENT",
        "SPAM",
        "TRASH",
        "CATEGORY_PERSONAL",
        "CATEGORY_SOCIAL",
        "CATEGORY_PROMOTIONS",
        "CATEGORY_UPDATES",
        "CATEGORY_FORUMS",
    }
)
# Google's guidance for rate-limit errors: exponential backoff from 1 s, at most 32 s
# between tries ("Resolve errors", Gmail API guides).
BACKOFF_INITIAL: Final = 1.0
BACKOFF_MAX: Final = 32.0
# One HTTP request may take this long; the poll engine's per-message timeout and
# retry_for bound the whole delivery.
REQUEST_TIMEOUT: Final = 60.0
# A Message-ID is rarely shared by more than a few mails (a list copy and a direct
# one); past this many candidates the lookup gives up rather than fetch them all.
LOOKUP_CANDIDATES_MAX: Final = 20
# Enough of Gmail's error message to see the reason, not enough to flood a log.
ERROR_EXCERPT_CHARS: Final = 300
# A resumable upload that keeps breaking gives up after this many status queries
# (each of them already follows a failed PUT).
UPLOAD_RESUMES_MAX: Final = 20
# Rate-limit reasons Google sends with 403 (and 429) that retrying later cures.
_RATE_REASONS: Final = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
_SCOPE_REASONS: Final = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"})

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Identity:
    """What finds a message again: its Message-ID (no brackets), its Date in
    milliseconds (Gmail's internalDate unit), the value of our identifying header."""

    message_id: str | None
    date_ms: int | None
    marker: str | None


# ----------------------------------------------------------------------- errors


class _Retryable(Exception):
    """A try failed in a way a later try may not: rate limits, 5xx, broken connections.

    ``uncertain``: the request may have taken effect (the import happened, its answer
    was lost), so look before trying again.
    """

    def __init__(self, reason: str, retry_after: float | None = None, *, uncertain: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.uncertain = uncertain


def _google_error(response: httpx.Response) -> tuple[str, frozenset[str]]:
    """Gmail's error message and reasons from ``{"error": {"message", "errors": [...]}}``."""
    try:
        document = response.json()
    except (ValueError, UnicodeDecodeError):
        document = None
    message = ""
    reasons: set[str] = set()
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", ""))
        for item in error.get("errors") or ():
            if isinstance(item, dict) and "reason" in item:
                reasons.add(str(item["reason"]))
        status = error.get("status")
        if isinstance(status, str):
            reasons.add(status)
        for detail in error.get("details") or ():
            if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
                reasons.add(detail["reason"])
    if not message:
        message = response.text
    if len(message) > ERROR_EXCERPT_CHARS:
        message = message[:ERROR_EXCERPT_CHARS] + "..."
    return message, frozenset(reasons)


def _describe(response: httpx.Response) -> str:
    message, reasons = _google_error(response)
    why = f" ({', '.join(sorted(reasons))})" if reasons else ""
    return f"HTTP {response.status_code}{why}: {message}"


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise TemporarySinkError(f"Gmail answered HTTP {response.status_code}, not JSON") from exc
    if not isinstance(document, dict):
        raise TemporarySinkError(f"Gmail answered HTTP {response.status_code} with odd JSON")
    return document


# ----------------------------------------------------------------------- pacing


class _Pacer:
    """A token bucket of one: imports start at most ``rate`` times a second."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


# ----------------------------------------------------------------------- the client


@dataclass(slots=True)
class _Upload:
    """A resumable upload under way: its session URI and how much the server holds."""

    url: str | None = None
    offset: int = 0
    interrupted: bool = False
    resumes: int = 0


class GmailClient:
    """One Gmail mailbox over the API, for the sink (popbox.collector.sinks.gmail).

    Each public method takes the delivery's ``deadline`` (``time.monotonic()``): retries
    stop before it.
    """

    def __init__(
        self,
        settings: GmailSinkSettings,
        tokens: TokenProvider,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        account: str = "ACCOUNT",
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self.name = settings.label
        self._account = account  # for the sign-in hint
        self._backoff_initial = backoff_initial
        user = quote(settings.user, safe="@")
        self._api = f"{settings.api_base}/gmail/v1/users/{user}"
        self._upload = f"{settings.api_base}/upload/gmail/v1/users/{user}/messages/import"
        self._pacer = _Pacer(settings.imports_per_second)
        self._label_ids: list[str] | None = None
        self._token: str | None = None
        # Verification stays on; a private CA is added, never a way to switch it off.
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self._client = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT,
            verify=verify,
            transport=transport,
            # A redirect would resend the message elsewhere, or drop the token.
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"GmailClient({self.name!r})"  # no token in reprs or logs

    async def aclose(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------ requests

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Run ``attempt`` until it returns, retrying _Retryable failures with backoff
        until ``deadline``; then TemporarySinkError with the last reason."""
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt()
            except _Retryable as exc:
                reason, delay = exc.reason, exc.retry_after
            if delay is None:
                delay = backoff_delay(tries, self._backoff_initial, BACKOFF_MAX)
            if time.monotonic() + delay >= deadline:
                raise TemporarySinkError(
                    f"{self.name}: {what} failed after {tries} tr{'ies' if tries > 1 else 'y'}: "
                    f"{reason}"
                )
            log.warning(
                "gmail: %s: %s failed (try %d): %s; again in %.2fs",
                self.name,
                what,
                tries,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _send(
        self,
        method: str,
        url: str,
        what: str,
        deadline: float,
        *,
        headers: Mapping[str, str] | None = None,
        accept: frozenset[int] = frozenset(),
        bad_request_permanent: bool = False,
        mailbox_wide: bool = False,
        **request: Any,
    ) -> httpx.Response:
        """One request with the Bearer token: the response when it is 2xx or in
        ``accept``; _Retryable, TemporarySinkError, SinkUnavailable or
        PermanentSinkError otherwise. ``mailbox_wide``: the request is about the
        mailbox, not a message, so any refusal of it is SinkUnavailable."""
        refreshed = False
        while True:
            token = await self._access_token(refreshed)
            sent = {**(headers or {}), "Authorization": f"Bearer {token}"}
            timeout = max(0.1, min(REQUEST_TIMEOUT, deadline - time.monotonic()))
            try:
                response = await self._client.request(
                    method, url, headers=sent, timeout=timeout, **request
                )
            except httpx.TransportError as exc:
                # The request may have reached Gmail (its answer was lost).
                raise _Retryable(
                    f"connection failed ({type(exc).__name__}: {exc})", uncertain=True
                ) from exc
            status = response.status_code
            if 200 <= status < 300 or status in accept:
                return response
            if status == 401 and not refreshed:
                # The token expired mid-run: one fresh token, then give up.
                refreshed = True
                continue
            raise self._failure(response, what, bad_request_permanent, mailbox_wide)

    async def _access_token(self, refresh: bool) -> str:
        if self._token is None or refresh:
            try:
                self._token = await self._tokens.token(force_refresh=refresh)
            except OAuthLoginRequired:
                raise  # the run fails loudly: the login has to be done again
            except PopboxError as exc:
                raise SinkUnavailable(f"{self.name}: no access token: {exc}") from exc
        return self._token

    def _failure(
        self,
        response: httpx.Response,
        what: str,
        bad_request_permanent: bool,
        mailbox_wide: bool,
    ) -> Exception:
        status = response.status_code
        message, reasons = _google_error(response)
        described = _describe(response)
        if status == 429 or status >= 500 or (status == 403 and reasons & _RATE_REASONS):
            delay = retry_after_seconds(response.headers.get("Retry-After"))
            return _Retryable(described, delay, uncertain=status >= 500)
        if status == 401:
            return SinkUnavailable(
                f"{self.name}: Gmail refused the access token even after a refresh ({message}); "
                f"sign in again with `popbox oauth login {self._account} --sink {self.name}`"
            )
        if status == 403 and reasons & _SCOPE_REASONS:
            return SinkUnavailable(
                f"{self.name}: the access token lacks a scope for {what} ({message}); "
                f"the Gmail sink needs {', '.join(GOOGLE_GMAIL_API_SCOPES)}: "
                "sign in again with those scopes"
            )
        if status == 403:
            return SinkUnavailable(f"{self.name}: Gmail forbids {what}: {described}")
        if status == 413 or (status == 400 and bad_request_permanent):
            return PermanentSinkError(f"{self.name}: Gmail refused {what}: {described}")
        if mailbox_wide:
            return SinkUnavailable(f"{self.name}: Gmail refused {what}: {described}")
        return TemporarySinkError(f"{self.name}: {what} failed: {described}")

    # ------------------------------------------------------------ labels

    async def label_ids(self, deadline: float) -> list[str]:
        """The configured labels as ids, user labels created when missing (once)."""
        if self._label_ids is None:
            self._label_ids = await self._retrying(
                "resolving labels", lambda: self._resolve_labels(deadline), deadline
            )
        return self._label_ids

    async def _resolve_labels(self, deadline: float) -> list[str]:
        known = await self._list_labels(deadline)
        ids: list[str] = []
        for wanted in self._settings.labels:
            found = wanted.upper() if wanted.upper() in SYSTEM_LABELS else None
            found = found or known.get(wanted) or known.get(wanted.casefold())
            if found is None:
                found = await self._create_label(wanted, deadline)
            if found not in ids:
                ids.append(found)
        return ids

    async def _list_labels(self, deadline: float) -> dict[str, str]:
        """Label id -> id and case-folded name -> id (Gmail's names ignore case)."""
        response = await self._send(
            "GET", f"{self._api}/labels", "listing labels", deadline, mailbox_wide=True
        )
        known: dict[str, str] = {}
        for label in _json(response).get("labels", ()):
            if isinstance(label, Mapping) and "id" in label and "name" in label:
                known[str(label["name"]).casefold()] = str(label["id"])
                known[str(label["id"])] = str(label["id"])
        return known

    async def _create_label(self, name: str, deadline: float) -> str:
        body = {"name": name, "labelListVisibility": "labelShow", "messageListVisibility": "show"}
        response = await self._send(
            "POST",
            f"{self._api}/labels",
            f"creating label {name!r}",
            deadline,
            accept=frozenset({409}),
            mailbox_wide=True,
            json=body,
        )
        if response.status_code == 409:
            # Another client created it meanwhile (or it differs only in case).
            found = (await self._list_labels(deadline)).get(name.casefold())
            if found is None:
                raise SinkUnavailable(
                    f"{self.name}: label {name!r} conflicts with an existing one: "
                    f"{_describe(response)}"
                )
            return found
        log.info("gmail: %s: created label %r", self.name, name)
        return str(_json(response)["id"])

    # ------------------------------------------------------------ lookup

    async def find(self, identity: Identity, deadline: float) -> bool:
        """Whether the mailbox already holds this message: candidates by Message-ID,
        confirmed by our header (``marker``) or, in message_id mode with
        ``internal_date_source = "dateHeader"``, by the internal date."""
        if identity.message_id is None:
            return False
        found: bool = await self._retrying(
            "looking the message up", lambda: self._find_once(identity, deadline), deadline
        )
        return found

    async def _find_once(self, identity: Identity, deadline: float) -> bool:
        assert identity.message_id is not None
        params = {
            "q": f"rfc822msgid:{identity.message_id}",
            "includeSpamTrash": "true",
            "maxResults": str(LOOKUP_CANDIDATES_MAX),
        }
        response = await self._send(
            "GET", f"{self._api}/messages", "looking the message up", deadline, params=params
        )
        candidates = [
            str(item["id"])
            for item in _json(response).get("messages", ())
            if isinstance(item, Mapping) and "id" in item
        ]
        if not candidates:
            return False
        if identity.marker is None and (
            self._settings.internal_date_source != "dateHeader" or identity.date_ms is None
        ):
            return True  # message_id mode: the Message-ID alone decides
        header = self._settings.id_header
        for candidate in candidates:
            response = await self._send(
                "GET",
                f"{self._api}/messages/{quote(candidate, safe='')}",
                "looking the message up",
                deadline,
                params={"format": "metadata", "metadataHeaders": header},
                accept=frozenset({404}),
            )
            if response.status_code == 404:
                continue  # deleted since the search
            document = _json(response)
            if identity.marker is not None:
                payload = document.get("payload")
                headers = payload.get("headers", ()) if isinstance(payload, Mapping) else ()
                if any(
                    isinstance(h, Mapping)
                    and str(h.get("name", "")).lower() == header.lower()
                    and str(h.get("value", "")).strip() == identity.marker
                    for h in headers
                ):
                    return True
            elif str(document.get("internalDate")) == str(identity.date_ms):
                return True
        return False

    # ------------------------------------------------------------ import

    def _import_params(self, upload_type: str) -> dict[str, str]:
        settings = self._settings
        return {
            "uploadType": upload_type,
            "internalDateSource": settings.internal_date_source,
            "neverMarkSpam": "true" if settings.never_mark_spam else "false",
            "processForCalendar": "true" if settings.process_for_calendar else "false",
        }

    async def import_multipart(
        self,
        uidl: str,
        data: bytes,
        label_ids: list[str],
        identity: Identity,
        deadline: float,
    ) -> None:
        """Import ``data`` in one multipart/related request. After a try that may have
        taken effect (no answer, a 5xx) the next try first looks the message up."""
        boundary = _boundary(data)
        metadata = json.dumps({"labelIds": label_ids}).encode("utf-8")
        body = b"".join(
            [
                b"--" + boundary + b"\r\n",
                b"Content-Type: application/json; charset=UTF-8\r\n\r\n",
                metadata + b"\r\n",
                b"--" + boundary + b"\r\n",
                b"Content-Type: message/rfc822\r\n\r\n",
                data + b"\r\n",
                b"--" + boundary + b"--\r\n",
            ]
        )
        headers = {"Content-Type": f"multipart/related; boundary={boundary.decode('ascii')}"}
        uncertain = False

        async def once() -> bool:
            nonlocal uncertain
            if (
                uncertain
                and identity.message_id is not None
                and await self._find_once(identity, deadline)
            ):
                return True
            await self._pacer.wait()
            try:
                await self._send(
                    "POST",
                    self._upload,
                    f"importing {uidl}",
                    deadline,
                    params=self._import_params("multipart"),
                    content=body,
                    headers=headers,
                    bad_request_permanent=True,
                )
            except _Retryable as exc:
                uncertain = uncertain or exc.uncertain
                raise
            return False

        if await self._retrying(f"importing {uidl}", once, deadline):
            log.info("gmail: %s: %s arrived before its answer was lost", self.name, uidl)

    async def import_resumable(
        self, uidl: str, data: bytes, label_ids: list[str], deadline: float
    ) -> None:
        """Import ``data`` through the resumable protocol: a broken upload asks the
        session how much arrived and sends the rest, so nothing is imported twice."""
        what = f"importing {uidl}"
        upload = _Upload()

        async def once() -> None:
            if upload.url is None:
                await self._pacer.wait()
                upload.url = await self._start_upload(data, label_ids, what, deadline)
                upload.offset, upload.interrupted = 0, False
            elif upload.interrupted:
                upload.resumes += 1
                if upload.resumes > UPLOAD_RESUMES_MAX:
                    raise TemporarySinkError(f"{self.name}: {what}: the upload keeps breaking")
                if await self._upload_status(upload, len(data), what, deadline):
                    return
            await self._put_rest(upload, data, what, deadline)

        await self._retrying(what, once, deadline)

    async def _start_upload(
        self, data: bytes, label_ids: list[str], what: str, deadline: float
    ) -> str:
        response = await self._send(
            "POST",
            self._upload,
            what,
            deadline,
            params=self._import_params("resumable"),
            json={"labelIds": label_ids},
            headers={
                "X-Upload-Content-Type": "message/rfc822",
                "X-Upload-Content-Length": str(len(data)),
            },
            bad_request_permanent=True,
        )
        location = str(response.headers.get("Location", ""))
        if not location:
            raise TemporarySinkError(f"{self.name}: {what}: no upload session URI in the answer")
        # The token goes along to the session URI: only to the API's host or Google's.
        host = httpx.URL(location).host
        if host != httpx.URL(self._settings.api_base).host and not host.endswith(".googleapis.com"):
            raise TemporarySinkError(f"{self.name}: {what}: upload session on host {host!r}")
        return location

    async def _upload_status(self, upload: _Upload, total: int, what: str, deadline: float) -> bool:
        """Ask how much of an interrupted upload arrived; True when all of it did."""
        assert upload.url is not None
        # A failure here leaves the upload interrupted: asked again on the next try.
        response = await self._send(
            "PUT",
            upload.url,
            what,
            deadline,
            headers={"Content-Range": f"bytes */{total}", "Content-Length": "0"},
            accept=frozenset({308, 404, 410}),
            bad_request_permanent=True,
        )
        if response.status_code in (404, 410):
            # The session expired before it completed: nothing was imported.
            upload.url = None
            raise _Retryable(f"upload session gone (HTTP {response.status_code})", 0.0)
        upload.interrupted = False
        if response.status_code != 308:
            return True
        upload.offset = _range_end(response.headers.get("Range"))
        return False

    async def _put_rest(self, upload: _Upload, data: bytes, what: str, deadline: float) -> None:
        assert upload.url is not None
        total = len(data)
        headers = {"Content-Type": "message/rfc822"}
        if upload.offset:
            headers["Content-Range"] = f"bytes {upload.offset}-{total - 1}/{total}"
        try:
            response = await self._send(
                "PUT",
                upload.url,
                what,
                deadline,
                content=data[upload.offset :],
                headers=headers,
                accept=frozenset({308, 404, 410}),
                bad_request_permanent=True,
            )
        except _Retryable as exc:
            # The resumable protocol settles the doubt: ask the session what it holds.
            upload.interrupted = exc.uncertain
            raise
        if response.status_code in (404, 410):
            upload.url = None
            raise _Retryable(f"upload session gone (HTTP {response.status_code})", 0.0)
        if response.status_code == 308:
            upload.offset = _range_end(response.headers.get("Range"))
            raise _Retryable(f"upload incomplete at {upload.offset} of {total} octets", 0.0)


def _boundary(data: bytes) -> bytes:
    """A multipart boundary that does not occur in the message."""
    while True:
        boundary = b"popbox-" + secrets.token_hex(16).encode("ascii")
        if boundary not in data:
            return boundary


def _range_end(value: str | None) -> int:
    """The next offset from a 308's ``Range: bytes=0-N`` (none: nothing arrived)."""
    if not value or not value.startswith("bytes=0-"):
        return 0
    end = value[len("bytes=0-") :]
    return int(end) + 1 if end.isdigit() else 0
