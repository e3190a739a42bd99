"""The archive sink: keep fetched mail in a local popbox user's archive, searchable.

For mail that should be kept and found again rather than read by a POP3 client: a
helpdesk's original of every message it turned into a ticket, or an old mailbox
drained for good. The message goes through the popbox server's Deliverer (a
``LocalDelivery`` handed in by the composition root), which maps the user as LMTP
would and keeps the message in that user's archive (docs/archive.md).

Exactly once without a ledger: the archive keeps a user's identical message once, so
a redelivery after a crash (the message kept, the collector's record not yet
written) finds the entry already there and stores nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from popbox.collector.base import FetchedMessage, LocalDelivery
from popbox.errors import (
    PermanentSinkError,
    PopboxError,
    TemporarySinkError,
    UnknownRecipient,
)

if TYPE_CHECKING:
    from popbox.collector.config import ArchiveSinkSettings
    from popbox.collector.sinks import SinkContext

__all__ = ["ArchiveSink", "create_sink"]

log = logging.getLogger(__name__)


class ArchiveSink:
    """Keep each message in ``user``'s archive through ``delivery``."""

    def __init__(
        self,
        delivery: LocalDelivery,
        user: str,
        *,
        name: str | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._delivery = delivery
        self._user = user
        self._name = name or f"archive:{user}"
        self._on_close = on_close

    @property
    def name(self) -> str:
        return self._name

    async def close(self) -> None:
        if self._on_close is not None:
            await self._on_close()

    async def deliver(self, message: FetchedMessage) -> None:
        try:
            receipt = await self._delivery.archive_file(self._user, message.path)
        except UnknownRecipient as exc:
            raise PermanentSinkError(f"{self._name}: no such popbox user: {exc}") from exc
        except PopboxError as exc:
            raise TemporarySinkError(f"{self._name}: cannot archive: {exc}") from exc
        except OSError as exc:
            raise TemporarySinkError(f"{self._name}: cannot archive: {exc}") from exc
        log.info("%s: kept %s as %s", self._name, message.idempotency_key, receipt.key)


def create_sink(settings: ArchiveSinkSettings, context: SinkContext) -> ArchiveSink:
    """Build the sink for ``settings`` (called by popbox.collector.sinks.build_sink)."""
    handle = context.local_delivery_for(settings.label, settings.config)
    return ArchiveSink(
        handle.delivery, settings.user, name=settings.label, on_close=handle.close
    )
