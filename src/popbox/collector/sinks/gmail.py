"""The Gmail sink: each fetched message goes into a Gmail mailbox by ``users.messages.import``.

Import (not insert, not SMTP) is what Gmail's own POP3 fetcher did: the message is
scanned and classified like received mail, without SPF/DMARC checks or forwarding
rules in the way, and it is given the configured labels (user labels are created on
first use). Messages up to GMAIL_SIMPLE_UPLOAD_MAX go in one multipart/related
request; bigger ones through the resumable protocol, which after a broken upload asks
the server how much arrived and sends the rest.

Exactly once. The poll engine counts each attempt before the sink runs; when
``message.attempt > 1`` (or an import request ended without an answer, a dropped
connection or a 5xx, within this attempt) the sink looks for the message in the
mailbox before importing it again:

- ``identify = "header"`` (default): the message gets one extra first line,
  ``X-Popbox-Id: <first 32 hex digits of SHA-256(idempotency key)>``; a message without
  a Message-ID also gets ``Message-ID: <popbox.<same hex>@popbox.invalid>``, because
  Gmail can search by Message-ID (``rfc822msgid:``) but not by any other header. A
  candidate counts when its ``X-Popbox-Id`` (``format=metadata``) is ours. A
  Message-ID that search cannot take as one term (spaces, quotes) is left alone, and
  such a message, like one in message_id mode without a Message-ID, is not looked up.
- ``identify = "message_id"``: the bytes stay untouched. A candidate with the same
  Message-ID counts when its internal date is the message's Date (with
  ``internal_date_source = "dateHeader"``, the import sets it so); with
  ``receivedTime`` the Message-ID alone decides, so a copy that reached the mailbox
  another way makes popbox skip this one. Gmail's ``sizeEstimate`` is not the size of
  the bytes imported, so it decides nothing. A message without a Message-ID cannot be
  found and is imported again (the risk the settings document).

Errors: 429, 403 ``rateLimitExceeded``/``userRateLimitExceeded`` and 5xx are retried
with exponential backoff and jitter (Retry-After honoured) for ``retry_for`` seconds,
then TemporarySinkError. 401: one token refresh, then TemporarySinkError. Other 403s
(missing scopes, a domain policy, Gmail not enabled) are TemporarySinkError naming the
cause: the mailbox is at fault, not the message. 400 and 413 on the import quarantine
the message (PermanentSinkError with Gmail's reason). Imports are paced to
``imports_per_second``. The access token never reaches a log or an error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote

import httpx

from popbox.collector.base import FetchedMessage
from popbox.collector.config_common import GOOGLE_GMAIL_API_SCOPES
from popbox.collector.config_sinks import GMAIL_SIMPLE_UPLOAD_MAX
from popbox.collector.sinks.webhook import _retry_after_seconds
from popbox.collector.tokens import TokenProvider
from popbox.errors import ConfigError, PermanentSinkError, PopboxError, TemporarySinkError

if TYPE_CHECKING:
    from popbox.collector.config import GmailSinkSettings
    from popbox.collector.sinks import SinkContext

__all__ = ["SYSTEM_LABELS", "GmailSink", "create_sink", "popbox_id"]

log = logging.getLogger(__name__)

# Gmail's system labels a fetched message may carry. DRAFT cannot be imported and CHAT
# is Gmail's own; SENT, SPAM and TRASH are allowed (a migration may want them).
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
_REFUSED_LABELS: Final = frozenset({"DRAFT", "CHAT"})
# Google's guidance for rate-limit errors: exponential backoff from 1 s, at most 32 s
# between tries ("Resolve errors", Gmail API guides).
BACKOFF_INITIAL: Final = 1.0
BACKOFF_MAX: Final = 32.0
# One HTTP request may take this long; the poll engine's per-message timeout and
# retry_for bound the whole delivery.
REQUEST_TIMEOUT: Final = 60.0
# Finish this long before the poll engine's own timeout, so the error names the cause.
ENGINE_TIMEOUT_MARGIN: Final = 1.0
# A Message-ID is rarely shared by more than a few mails (a list copy and a direct
# one); past this many candidates the lookup gives up rather than fetch them all.
LOOKUP_CANDIDATES_MAX: Final = 20
# Enough of Gmail's error message to see the reason, not enough to flood a log.
ERROR_EXCERPT_CHARS: Final = 300
# How much of the hex SHA-256 of the idempotency key goes into the header: 128 bits.
POPBOX_ID_HEX: Final = 32
# A resumable upload that keeps breaking gives up after this many status queries
# (each of them already follows a failed PUT).
UPLOAD_RESUMES_MAX: Final = 20
# Rate-limit reasons Google sends with 403 (and 429) that retrying later cures.
_RATE_REASONS: Final = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
_SCOPE_REASONS: Final = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"})

T = TypeVar("T")


def popbox_id(message: FetchedMessage) -> str:
    """The value of the identifying header: 128 bits of SHA-256 of the idempotency key."""
    return hashlib.sha256(message.idempotency_key.encode("utf-8")).hexdigest()[:POPBOX_ID_HEX]


# ------------------------------------------------------------------ message headers


def _header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data if end < 0 else data[: end + 2]


@dataclass(frozen=True, slots=True)
class _Identity:
    """What finds a message again: its Message-ID (no brackets), Date, our header."""

    message_id: str | None
    date_ms: int | None
    marker: str | None


def _read_identity(data: bytes) -> tuple[bool, str | None, int | None]:
    """Whether the message has a Message-ID field, its value if Gmail can search for
    it, and its Date in milliseconds (Gmail's internalDate unit)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(_header_block(data))
    raw_id = headers.get("Message-ID")
    message_id: str | None = None
    if raw_id is not None:
        value = str(raw_id).strip()
        if value.startswith("<") and value.endswith(">"):
            value = value[1:-1].strip()
        # A Message-ID Gmail's search cannot take as one term cannot be looked up.
        if value and not any(c.isspace() or c in '"()' for c in value) and value.isascii():
            message_id = value
    date_ms: int | None = None
    raw_date = headers.get("Date")
    if raw_date is not None:
        try:
            when = email.utils.parsedate_to_datetime(str(raw_date))
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            date_ms = int(when.timestamp() * 1000)
    return raw_id is not None, message_id, date_ms


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


class _MailboxRefused(TemporarySinkError):
    """Gmail refused the login or the mailbox, not the message: every later message
    of this run would meet the same answer."""


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


# ----------------------------------------------------------------------- the sink


@dataclass(slots=True)
class _Upload:
    """A resumable upload under way: its session URI and how much the server holds."""

    url: str | None = None
    offset: int = 0
    interrupted: bool = False
    resumes: int = 0


class GmailSink:
    """Import each message into a Gmail mailbox; see the module docstring."""

    def __init__(
        self,
        settings: GmailSinkSettings,
        tokens: TokenProvider,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        simple_upload_max: int = GMAIL_SIMPLE_UPLOAD_MAX,
        account: str = "ACCOUNT",
    ) -> None:
        refused = [label for label in settings.labels if label.upper() in _REFUSED_LABELS]
        if refused:
            raise ConfigError(f"sink {settings.label}: labels: Gmail cannot import into {refused}")
        self._settings = settings
        self._tokens = tokens
        self._account = account  # for the sign-in hint
        self._backoff_initial = backoff_initial
        self._simple_upload_max = simple_upload_max
        self._user = quote(settings.user, safe="@")
        self._api = f"{settings.api_base}/gmail/v1/users/{self._user}"
        self._upload = f"{settings.api_base}/upload/gmail/v1/users/{self._user}/messages/import"
        self._pacer = _Pacer(settings.imports_per_second)
        self._label_ids: list[str] | None = None
        self._token: str | None = None
        # A refusal of the login or the mailbox (not of a message) ends this sink's
        # run: the messages after it fail at once instead of asking Gmail again.
        self._refused: TemporarySinkError | None = None
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
        return f"GmailSink({self._settings.label!r})"  # no token in reprs or logs

    @property
    def name(self) -> str:
        return self._settings.label

    async def close(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------ deliver

    async def deliver(self, message: FetchedMessage) -> None:
        if self._refused is not None:
            raise TemporarySinkError(str(self._refused))
        try:
            await self._deliver(message)
        except _MailboxRefused as exc:
            self._refused = exc
            raise

    async def _deliver(self, message: FetchedMessage) -> None:
        try:
            raw = await asyncio.to_thread(message.read_bytes)
        except OSError as exc:
            raise TemporarySinkError(f"{self.name}: cannot read spooled message: {exc}") from exc
        data, identity = self._prepare(message, raw)
        deadline = time.monotonic() + self._budget()
        label_ids = await self._labels(deadline)
        if message.attempt > 1 and await self._find(identity, deadline):
            log.info(
                "gmail: %s already holds %s (attempt %d); not imported again",
                self.name,
                message.idempotency_key,
                message.attempt,
            )
            return
        if len(data) > self._simple_upload_max:
            await self._import_resumable(message, data, label_ids, identity, deadline)
        else:
            await self._import_multipart(message, data, label_ids, identity, deadline)
        log.info("gmail: imported %s into %s", message.idempotency_key, self.name)

    def _budget(self) -> float:
        """Seconds this delivery may spend: retry_for, within the engine's timeout."""
        timeout = self._settings.timeout
        engine = max(timeout - ENGINE_TIMEOUT_MARGIN, timeout / 2)
        return min(self._settings.retry_for, engine)

    def _prepare(self, message: FetchedMessage, raw: bytes) -> tuple[bytes, _Identity]:
        has_message_id, message_id, date_ms = _read_identity(raw)
        if self._settings.identify == "message_id":
            return raw, _Identity(message_id, date_ms, None)
        marker = popbox_id(message)
        prefix = f"{self._settings.id_header}: {marker}\r\n".encode("ascii")
        if not has_message_id:
            # Gmail searches by Message-ID only: give the message one to be found by.
            message_id = f"popbox.{marker}@popbox.invalid"
            prefix += f"Message-ID: <{message_id}>\r\n".encode("ascii")
        return prefix + raw, _Identity(message_id, date_ms, marker)

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
                # Jitter keeps many collectors from retrying in lockstep.
                ceiling = min(BACKOFF_MAX, self._backoff_initial * 2 ** (tries - 1))
                delay = random.uniform(ceiling / 2, ceiling)
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
        **request: Any,
    ) -> httpx.Response:
        """One request with the Bearer token: the response when it is 2xx or in
        ``accept``; _Retryable, TemporarySinkError or PermanentSinkError otherwise."""
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
            raise self._failure(response, what, bad_request_permanent)

    async def _access_token(self, refresh: bool) -> str:
        if self._token is None or refresh:
            try:
                self._token = await self._tokens.token(force_refresh=refresh)
            except PopboxError as exc:
                raise TemporarySinkError(f"{self.name}: no access token: {exc}") from exc
        return self._token

    def _failure(
        self, response: httpx.Response, what: str, bad_request_permanent: bool
    ) -> Exception:
        status = response.status_code
        message, reasons = _google_error(response)
        described = _describe(response)
        if status == 429 or status >= 500 or (status == 403 and reasons & _RATE_REASONS):
            delay = _retry_after_seconds(response.headers.get("Retry-After"))
            return _Retryable(described, delay, uncertain=status >= 500)
        if status == 401:
            return _MailboxRefused(
                f"{self.name}: Gmail refused the access token even after a refresh ({message}); "
                f"sign in again with `popbox oauth login {self._account} --sink {self.name}`"
            )
        if status == 403 and reasons & _SCOPE_REASONS:
            return _MailboxRefused(
                f"{self.name}: the access token lacks a scope for {what} ({message}); "
                f"the Gmail sink needs {', '.join(GOOGLE_GMAIL_API_SCOPES)}: "
                "sign in again with those scopes"
            )
        if status == 403:
            return _MailboxRefused(f"{self.name}: Gmail forbids {what}: {described}")
        if status == 413 or (status == 400 and bad_request_permanent):
            return PermanentSinkError(f"{self.name}: Gmail refused {what}: {described}")
        return TemporarySinkError(f"{self.name}: {what} failed: {described}")

    # ------------------------------------------------------------ labels

    async def _labels(self, deadline: float) -> list[str]:
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
        response = await self._send("GET", f"{self._api}/labels", "listing labels", deadline)
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
            json=body,
        )
        if response.status_code == 409:
            # Another client created it meanwhile (or it differs only in case).
            found = (await self._list_labels(deadline)).get(name.casefold())
            if found is None:
                raise TemporarySinkError(
                    f"{self.name}: label {name!r} conflicts with an existing one: "
                    f"{_describe(response)}"
                )
            return found
        log.info("gmail: %s: created label %r", self.name, name)
        return str(_json(response)["id"])

    # ------------------------------------------------------------ lookup

    async def _find(self, identity: _Identity, deadline: float) -> bool:
        """Whether the mailbox already holds this message (see the module docstring)."""
        if identity.message_id is None:
            return False
        found: bool = await self._retrying(
            "looking the message up", lambda: self._find_once(identity, deadline), deadline
        )
        return found

    async def _find_once(self, identity: _Identity, deadline: float) -> bool:
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

    async def _import_multipart(
        self,
        message: FetchedMessage,
        data: bytes,
        label_ids: list[str],
        identity: _Identity,
        deadline: float,
    ) -> None:
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
                    f"importing {message.uidl}",
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

        if await self._retrying(f"importing {message.uidl}", once, deadline):
            log.info("gmail: %s: %s arrived before its answer was lost", self.name, message.uidl)

    async def _import_resumable(
        self,
        message: FetchedMessage,
        data: bytes,
        label_ids: list[str],
        identity: _Identity,
        deadline: float,
    ) -> None:
        what = f"importing {message.uidl}"
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


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise TemporarySinkError(f"Gmail answered HTTP {response.status_code}, not JSON") from exc
    if not isinstance(document, dict):
        raise TemporarySinkError(f"Gmail answered HTTP {response.status_code} with odd JSON")
    return document


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


def create_sink(settings: GmailSinkSettings, context: SinkContext) -> GmailSink:
    """Build the sink for ``settings`` (called by popbox.collector.sinks.build_sink)."""
    return GmailSink(settings, context.token_provider(settings), account=context.account.name)
