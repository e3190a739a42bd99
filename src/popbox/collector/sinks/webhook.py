"""The webhook sink: POST each fetched message as signed JSON to a ticket system.

The body is one JSON object (schema in docs/collector-webhook.md) built from the message
with the stdlib ``email`` package; a malformed message still yields a payload with
whatever could be parsed, plus a ``defects`` list, so one broken mail never blocks the
queue. Every request carries::

    Content-Type: application/json
    Idempotency-Key: <account>:<uidl>:<sha256>     (FetchedMessage.idempotency_key)
    X-Popbox-Timestamp: <unix seconds>
    X-Popbox-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

The timestamp is inside the signed material so a receiver can reject replays older
than a few minutes; the body is signed byte for byte as sent. Each retry signs afresh
with a new timestamp; the body and the Idempotency-Key stay identical, so the receiver
deduplicates on the key.

Outcomes: 2xx delivered. 429, 5xx, timeouts and connection errors are retried within
the call with exponential backoff (Retry-After honoured up to a cap), then raise
TemporarySinkError. Any other status raises PermanentSinkError with the status and a
bounded excerpt of the response body. The shared secret never reaches a log or repr.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import Mapping
from datetime import UTC
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx

from popbox.collector.base import FetchedMessage
from popbox.collector.sinks.http_retry import backoff_delay, retry_after_seconds
from popbox.errors import PermanentSinkError, TemporarySinkError

if TYPE_CHECKING:
    from popbox.collector.config import WebhookSinkSettings
    from popbox.collector.sinks import SinkContext

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookSink",
    "build_payload",
    "create_sink",
    "encode_payload",
    "sign",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Popbox-Signature"
TIMESTAMP_HEADER: Final = "X-Popbox-Timestamp"
# Bumped only when a field changes meaning, so receivers can branch on it.
PAYLOAD_VERSION: Final = 1

# Ticket systems commonly cap uploads around 10-25 MB (Zammad, osTicket defaults);
# past these we send the attachment's metadata without its content.
DEFAULT_ATTACHMENT_MAX_BYTES: Final = 10 * 1024 * 1024
DEFAULT_ATTACHMENTS_TOTAL_MAX_BYTES: Final = 25 * 1024 * 1024
# The raw message doubles the body size once base64'd; same order as the total cap.
DEFAULT_RAW_MAX_BYTES: Final = 25 * 1024 * 1024
# Bounded attempts keep one slow receiver from stalling the account's poll for long;
# the poll engine retries the message later after TemporarySinkError.
DEFAULT_MAX_ATTEMPTS: Final = 4
DEFAULT_BACKOFF_INITIAL: Final = 1.0
DEFAULT_BACKOFF_MAX: Final = 30.0
# A Retry-After longer than this is not waited for in-process; we hand the message
# back to the poll engine (TemporarySinkError) instead of holding the account.
DEFAULT_RETRY_AFTER_MAX: Final = 60.0
DEFAULT_TIMEOUT: Final = 30.0
# How long before the poll engine's own per-delivery timeout our retries stop.
ENGINE_TIMEOUT_MARGIN: Final = 1.0
# Enough of an error body to see the receiver's reason, not enough to flood a log.
ERROR_EXCERPT_CHARS: Final = 500
# Real mail nests a handful of levels; a hostile message nesting thousands deep must
# not exhaust the recursion limit while we look for attachments.
MIME_DEPTH_MAX: Final = 32
# Header values in the payload are bounded: a hostile References header can be huge.
HEADER_VALUE_MAX_CHARS: Final = 16 * 1024


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Popbox-Signature value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


# ---------------------------------------------------------------------------- payload


def _safe_header(msg: Message, name: str, defects: list[str]) -> str | None:
    """One header decoded from RFC 2047, or None; never raises on malformed input."""
    try:
        value = msg.get(name)
        if value is None:
            return None
        text = str(value)
    except Exception as exc:  # the email header parser has raised many kinds on junk
        defects.append(f"{name}: {type(exc).__name__}")
        raw = _raw_header(msg, name)
        if raw is None:
            return None
        try:
            text = str(make_header(decode_header(raw)))
        except Exception:
            text = raw
    return text[:HEADER_VALUE_MAX_CHARS]


def _raw_header(msg: Message, name: str) -> str | None:
    for key, value in msg.raw_items() if isinstance(msg, EmailMessage) else msg.items():
        if key.lower() == name.lower():
            return str(value)
    return None


def _addresses(msg: Message, name: str, defects: list[str]) -> list[dict[str, str]]:
    """An address header as [{name, address}], groups flattened; [] if unparseable."""
    try:
        header = msg.get(name)
        if header is None:
            return []
        found = getattr(header, "addresses", None)
        if found is not None:
            return [{"name": a.display_name, "address": a.addr_spec} for a in found]
    except Exception as exc:  # see _safe_header: a broken header must not sink the payload
        defects.append(f"{name}: {type(exc).__name__}")
    raw = _safe_header(msg, name, defects)
    if raw is None:
        return []
    return [
        {"name": display, "address": address}
        for display, address in email.utils.getaddresses([raw])
        if display or address
    ]


def _date_iso(value: str | None) -> str | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        # RFC 5322 "-0000" means "zone unknown"; UTC is the least wrong reading.
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat()


def decode_text(data: bytes, charset: str | None) -> str:
    """Bytes of a text part to str: declared charset, then UTF-8, then replacement.

    Mail often lies about its charset (8-bit bytes labelled us-ascii, unknown labels),
    so a strict attempt with the label comes first, then strict UTF-8, and only then
    the label (or UTF-8 if unknown) with U+FFFD for what cannot be decoded.
    """
    label = (charset or "us-ascii").strip().lower()
    for candidate in (label, "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    try:
        return data.decode(label, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def _part_bytes(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


class _Budget:
    """How many attachment bytes may still be embedded in this payload."""

    def __init__(self, per_item: int, total: int) -> None:
        self.per_item = per_item
        self.remaining = total

    def take(self, size: int) -> bool:
        if size > self.per_item or size > self.remaining:
            return False
        self.remaining -= size
        return True


def build_payload(
    message: FetchedMessage,
    raw: bytes,
    *,
    include_raw: bool = False,
    attachment_max_bytes: int = DEFAULT_ATTACHMENT_MAX_BYTES,
    attachments_total_max_bytes: int = DEFAULT_ATTACHMENTS_TOTAL_MAX_BYTES,
    raw_max_bytes: int = DEFAULT_RAW_MAX_BYTES,
) -> dict[str, Any]:
    """The JSON-ready payload for one message (schema: docs/collector-webhook.md)."""
    defects: list[str] = []
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    defects.extend(type(d).__name__ for d in msg.defects)

    date = _safe_header(msg, "Date", defects)
    payload: dict[str, Any] = {
        "version": PAYLOAD_VERSION,
        "account": message.account,
        "uidl": message.uidl,
        "idempotency_key": message.idempotency_key,
        "size": message.size,
        "sha256": message.sha256,
        "from": _addresses(msg, "From", defects),
        "to": _addresses(msg, "To", defects),
        "cc": _addresses(msg, "Cc", defects),
        "reply_to": _addresses(msg, "Reply-To", defects),
        "subject": _safe_header(msg, "Subject", defects),
        "date": date,
        "date_iso": _date_iso(date),
        "message_id": _safe_header(msg, "Message-ID", defects),
        "in_reply_to": _safe_header(msg, "In-Reply-To", defects),
        "references": (_safe_header(msg, "References", defects) or "").split(),
    }
    payload.update(
        _bodies_and_attachments(
            msg, _Budget(attachment_max_bytes, attachments_total_max_bytes), defects
        )
    )
    if include_raw:
        if len(raw) <= raw_max_bytes:
            payload["raw"] = base64.b64encode(raw).decode("ascii")
            payload["raw_omitted"] = False
        else:
            payload["raw"] = None
            payload["raw_omitted"] = True
    payload["defects"] = sorted(set(defects))
    return payload


def _bodies_and_attachments(
    msg: Message, budget: _Budget, defects: list[str]
) -> dict[str, Any]:
    text_part: Message | None = None
    html_part: Message | None = None
    if isinstance(msg, EmailMessage):
        try:
            text_part = msg.get_body(preferencelist=("plain",))
            html_part = msg.get_body(preferencelist=("html",))
        except Exception as exc:  # get_body walks malformed structures; keep going
            defects.append(f"body: {type(exc).__name__}")
    bodies = {id(p) for p in (text_part, html_part) if p is not None}

    attachments: list[dict[str, Any]] = []
    for part in _leaves(msg):
        if id(part) in bodies:
            continue
        try:
            # Every leaf that is not the chosen body is kept: a second inline text part
            # or an inline image is content the ticket needs as much as an attachment.
            attachments.append(_attachment(part, budget))
        except Exception as exc:  # one broken part must not lose the others
            defects.append(f"attachment: {type(exc).__name__}")

    return {
        "text": _body_text(text_part, defects),
        "html": _body_text(html_part, defects),
        "attachments": attachments,
    }


def _leaves(part: Message, depth: int = 0) -> list[Message]:
    """Leaf parts in order; an attached message/rfc822 counts as one leaf (a .eml)."""
    if part.get_content_type() == "message/rfc822" or not part.is_multipart():
        return [part]
    found: list[Message] = []
    children = part.get_payload()
    if isinstance(children, list) and depth < MIME_DEPTH_MAX:
        for child in children:
            if isinstance(child, Message):
                found.extend(_leaves(child, depth + 1))
    return found


def _body_text(part: Message | None, defects: list[str]) -> str | None:
    if part is None:
        return None
    try:
        return decode_text(_part_bytes(part), part.get_content_charset())
    except Exception as exc:  # a broken transfer encoding still leaves the headers
        defects.append(f"body: {type(exc).__name__}")
        return None


def _attachment(part: Message, budget: _Budget) -> dict[str, Any]:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        first = inner[0] if isinstance(inner, list) and inner else None
        data = first.as_bytes() if isinstance(first, Message) else b""
    else:
        data = _part_bytes(part)
    embed = budget.take(len(data))
    return {
        "filename": part.get_filename(),
        "content_type": part.get_content_type(),
        "disposition": part.get_content_disposition(),
        "content_id": part.get("Content-ID"),
        "size": len(data),
        "content": base64.b64encode(data).decode("ascii") if embed else None,
        "content_omitted": not embed,
    }


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The payload as JSON in valid UTF-8.

    The email parser keeps header bytes it could not decode as lone surrogates
    (surrogateescape), which UTF-8 cannot encode. Turning them back into bytes and
    decoding once more recovers raw UTF-8 headers (RFC 6532: ``From: Jürgen``) and
    replaces anything else with U+FFFD.
    """
    text = json.dumps(payload, ensure_ascii=False)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode("utf-8")


# ----------------------------------------------------------------------------- sink


def _excerpt(response: httpx.Response) -> str:
    text = response.text
    if len(text) > ERROR_EXCERPT_CHARS:
        return text[:ERROR_EXCERPT_CHARS] + "..."
    return text


class WebhookSink:
    """POST each message as signed JSON to ``url``; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        secret: str | bytes | None,
        signature_header: str = SIGNATURE_HEADER,
        include_raw: bool = False,
        attachment_max_bytes: int = DEFAULT_ATTACHMENT_MAX_BYTES,
        attachments_total_max_bytes: int = DEFAULT_ATTACHMENTS_TOTAL_MAX_BYTES,
        raw_max_bytes: int = DEFAULT_RAW_MAX_BYTES,
        timeout: float = DEFAULT_TIMEOUT,
        total_timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        retry_after_max: float = DEFAULT_RETRY_AFTER_MAX,
        ca_file: Path | str | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        name: str | None = None,
    ) -> None:
        if secret is not None and not secret:
            # An empty key would "sign" with a value anyone can compute.
            raise ValueError("webhook signing secret is empty; omit it or set a real one")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._url = url
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self._signature_header = signature_header
        self._name = name or f"webhook:{url}"
        self._include_raw = include_raw
        self._attachment_max_bytes = attachment_max_bytes
        self._attachments_total_max_bytes = attachments_total_max_bytes
        self._raw_max_bytes = raw_max_bytes
        self._max_attempts = max_attempts
        self._timeout = timeout
        self._total_timeout = total_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._retry_after_max = retry_after_max
        self._extra_headers = dict(headers or {})
        # Verification stays on; a private CA is added, never a way to switch it off.
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file))
        self._client = httpx.AsyncClient(
            timeout=timeout,
            verify=verify,
            transport=transport,
            # A redirect would turn the POST into a GET or resend the body elsewhere.
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"WebhookSink({self._url!r})"  # the secret stays out of reprs and logs

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        await self._client.aclose()

    async def deliver(self, message: FetchedMessage) -> None:
        try:
            raw = await asyncio.to_thread(message.read_bytes)
        except OSError as exc:
            raise TemporarySinkError(f"{self._name}: cannot read spooled message: {exc}") from exc
        payload = build_payload(
            message,
            raw,
            include_raw=self._include_raw,
            attachment_max_bytes=self._attachment_max_bytes,
            attachments_total_max_bytes=self._attachments_total_max_bytes,
            raw_max_bytes=self._raw_max_bytes,
        )
        body = encode_payload(payload)
        await self._post_with_retries(message, body)

    async def _post_with_retries(self, message: FetchedMessage, body: bytes) -> None:
        reason = "no attempt made"
        deadline = None if self._total_timeout is None else time.monotonic() + self._total_timeout
        attempt = 0
        while attempt < self._max_attempts:
            attempt += 1
            delay: float | None = None
            request_timeout = self._timeout
            if deadline is not None:
                request_timeout = min(request_timeout, deadline - time.monotonic())
            try:
                response = await self._client.post(
                    self._url,
                    content=body,
                    headers=self._headers(message, body),
                    timeout=request_timeout,
                )
            except httpx.TimeoutException as exc:
                reason = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                reason = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    log.info(
                        "webhook delivered %s to %s: HTTP %d (attempt %d)",
                        message.idempotency_key, self._url, status, attempt,
                    )
                    return
                if status != 429 and not 500 <= status < 600:
                    raise PermanentSinkError(
                        f"webhook {self._url} refused {message.uidl}: "
                        f"HTTP {status}: {_excerpt(response)}"
                    )
                reason = f"HTTP {status}: {_excerpt(response)}"
                delay = retry_after_seconds(response.headers.get("Retry-After"))
                if delay is not None and delay > self._retry_after_max:
                    raise TemporarySinkError(
                        f"webhook {self._url} asked to retry {message.uidl} after "
                        f"{delay:.0f}s (more than {self._retry_after_max:.0f}s): {reason}"
                    )
            if attempt == self._max_attempts:
                break
            if delay is None:
                # Jitter keeps many collectors from retrying in lockstep.
                delay = backoff_delay(attempt, self._backoff_initial, self._backoff_max)
            if deadline is not None and time.monotonic() + delay >= deadline:
                # The next attempt could not finish in time; say why ourselves rather
                # than be cancelled by the poll engine's timeout mid-request.
                break
            log.warning(
                "webhook %s attempt %d/%d for %s failed: %s; retrying in %.2fs",
                self._url, attempt, self._max_attempts, message.idempotency_key,
                reason, delay,
            )
            await asyncio.sleep(delay)
        raise TemporarySinkError(
            f"webhook {self._url} failed {message.uidl} after "
            f"{attempt} attempt{'s' if attempt > 1 else ''}: {reason}"
        )

    def _headers(self, message: FetchedMessage, body: bytes) -> dict[str, str]:
        headers = dict(self._extra_headers)
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = message.idempotency_key
        if self._secret is not None:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[self._signature_header] = sign(self._secret, timestamp, body)
        return headers


def create_sink(settings: WebhookSinkSettings, context: SinkContext) -> WebhookSink:
    """Build the sink for ``settings`` (called by popbox.collector.sinks.build_sink)."""
    source = settings.secret_source()
    return WebhookSink(
        settings.url,
        secret=source.read() if source is not None else None,
        signature_header=settings.signature_header,
        headers=settings.headers,
        timeout=settings.timeout,
        # The poll engine cancels a delivery after settings.timeout; finishing just
        # before it lets the error name the real cause (HTTP 503, ...) instead.
        total_timeout=max(settings.timeout - ENGINE_TIMEOUT_MARGIN, settings.timeout / 2),
        include_raw=settings.include_raw,
        attachment_max_bytes=settings.max_attachment_bytes,
        # "retries" counts the extra tries after the first one.
        max_attempts=settings.retries + 1,
        ca_file=settings.ca_file,
        name=settings.label,
    )
