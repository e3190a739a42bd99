"""The Gmail sink: each fetched message goes into a Gmail mailbox by ``users.messages.import``.

Import (not insert, not SMTP) is what Gmail's own POP3 fetcher did: the message is
scanned and classified like received mail, without SPF/DMARC checks or forwarding
rules in the way, and it is given the configured labels (user labels are created on
first use). The requests, their retries and Google's error answers are
popbox.collector.sinks.gmail_api's; this module decides what is sent and when.

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

Errors (see gmail_api): rate limits, 5xx and broken connections are retried for
``retry_for`` seconds, then TemporarySinkError. A refused login or mailbox (401 after
one token refresh, any 403 that is not a rate limit, labels that cannot be listed or
created) is SinkUnavailable: the run stops, no message is counted as failed or
quarantined. 400 and 413 on the import quarantine the message (PermanentSinkError).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

import httpx

from popbox.collector.base import FetchedMessage
from popbox.collector.config_sinks import GMAIL_SIMPLE_UPLOAD_MAX
from popbox.collector.sinks.gmail_api import BACKOFF_INITIAL, GmailClient, Identity
from popbox.collector.sinks.message_head import popbox_id, read_head
from popbox.collector.tokens import TokenProvider
from popbox.errors import TemporarySinkError

if TYPE_CHECKING:
    from popbox.collector.config import GmailSinkSettings
    from popbox.collector.sinks import SinkContext

__all__ = ["GmailSink", "create_sink"]

log = logging.getLogger(__name__)

# Finish this long before the poll engine's own timeout, so the error names the cause.
ENGINE_TIMEOUT_MARGIN: Final = 1.0


def _identity(data: bytes) -> tuple[bool, str | None, int | None]:
    """Whether the message has a Message-ID field, its value (no brackets) if Gmail
    can search for it, and its Date in milliseconds (Gmail's internalDate unit)."""
    head = read_head(data)
    message_id: str | None = None
    if head.message_id is not None:
        value = head.message_id
        if value.startswith("<") and value.endswith(">"):
            value = value[1:-1].strip()
        # A Message-ID Gmail's search cannot take as one term cannot be looked up.
        if value and not any(c.isspace() or c in '"()' for c in value):
            message_id = value
    date_ms = int(head.date.timestamp() * 1000) if head.date is not None else None
    return head.has_message_id, message_id, date_ms


# ----------------------------------------------------------------------- the sink


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
        self._settings = settings
        self._simple_upload_max = simple_upload_max
        self._gmail = GmailClient(
            settings,
            tokens,
            transport=transport,
            backoff_initial=backoff_initial,
            account=account,
        )

    def __repr__(self) -> str:
        return f"GmailSink({self._settings.label!r})"  # no token in reprs or logs

    @property
    def name(self) -> str:
        return self._settings.label

    async def close(self) -> None:
        await self._gmail.aclose()

    async def deliver(self, message: FetchedMessage) -> None:
        try:
            raw = await asyncio.to_thread(message.read_bytes)
        except OSError as exc:
            raise TemporarySinkError(f"{self.name}: cannot read spooled message: {exc}") from exc
        data, identity = self._prepare(message, raw)
        deadline = time.monotonic() + self._budget()
        label_ids = await self._gmail.label_ids(deadline)
        if message.attempt > 1 and await self._gmail.find(identity, deadline):
            log.info(
                "gmail: %s already holds %s (attempt %d); not imported again",
                self.name,
                message.idempotency_key,
                message.attempt,
            )
            return
        if len(data) > self._simple_upload_max:
            await self._gmail.import_resumable(message.uidl, data, label_ids, deadline)
        else:
            await self._gmail.import_multipart(message.uidl, data, label_ids, identity, deadline)
        log.info("gmail: imported %s into %s", message.idempotency_key, self.name)

    def _budget(self) -> float:
        """Seconds this delivery may spend: retry_for, within the engine's timeout."""
        timeout = self._settings.timeout
        engine = max(timeout - ENGINE_TIMEOUT_MARGIN, timeout / 2)
        return min(self._settings.retry_for, engine)

    def _prepare(self, message: FetchedMessage, raw: bytes) -> tuple[bytes, Identity]:
        has_message_id, message_id, date_ms = _identity(raw)
        if self._settings.identify == "message_id":
            return raw, Identity(message_id, date_ms, None)
        marker = popbox_id(message)
        prefix = f"{self._settings.id_header}: {marker}\r\n".encode("ascii")
        if not has_message_id:
            # Gmail searches by Message-ID only: give the message one to be found by.
            message_id = f"popbox.{marker}@popbox.invalid"
            prefix += f"Message-ID: <{message_id}>\r\n".encode("ascii")
        return prefix + raw, Identity(message_id, date_ms, marker)


def create_sink(settings: GmailSinkSettings, context: SinkContext) -> GmailSink:
    """Build the sink for ``settings`` (called by popbox.collector.sinks.build_sink)."""
    return GmailSink(settings, context.token_provider(settings), account=context.account.name)
