"""What a sink that writes into a remote mailbox (IMAP, the Gmail API) reads of a
message's header to find it there again, and the identity value it may add.

Both look a message up after an uncertain attempt: by ``popbox_id`` in a header they
add, or by the Message-ID the message already has; both set the mailbox's date of a
message from its Date header.
"""

from __future__ import annotations

import email.utils
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Final

from popbox.collector.base import FetchedMessage

__all__ = ["HEADER_SCAN_MAX", "POPBOX_ID_HEX", "MessageHead", "popbox_id", "read_head"]

# 128 bits of the SHA-256 of the idempotency key: unique across any mailbox's life.
POPBOX_ID_HEX: Final = 32
# Date and Message-ID are looked for in this much of a message: RFC 5322 headers of
# real mail are a few KiB; a hostile header block is not parsed past this.
HEADER_SCAN_MAX: Final = 256 * 1024


def popbox_id(message: FetchedMessage) -> str:
    """The value of the identifying header (``X-Popbox-Id``) a sink adds: its
    idempotency key, hashed, the same in every run that offers the message."""
    return hashlib.sha256(message.idempotency_key.encode("utf-8")).hexdigest()[:POPBOX_ID_HEX]


@dataclass(frozen=True, slots=True)
class MessageHead:
    has_message_id: bool
    """Whether the header has a Message-ID field at all (usable or not)."""
    message_id: str | None
    """The Message-ID as written (angle brackets kept), its folding whitespace
    collapsed; None when absent or not ASCII (no search could take it)."""
    date: datetime | None
    """The Date as an aware datetime; a date without a zone, or "-0000", is read as
    UTC (RFC 5322 section 3.3: UTC, source zone unknown). None when unreadable."""


def _header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data if end < 0 else data[: end + 2]


def read_head(data: bytes) -> MessageHead:
    """The Message-ID and Date of the message ``data`` (only its first
    HEADER_SCAN_MAX octets are read); never raises on malformed headers."""
    header = BytesHeaderParser(policy=compat32).parsebytes(_header_block(data[:HEADER_SCAN_MAX]))
    date: datetime | None = None
    raw_date = header.get("Date")
    if raw_date is not None:
        try:
            date = email.utils.parsedate_to_datetime(str(raw_date))
        except (TypeError, ValueError, IndexError, OverflowError):
            date = None
        if date is not None and date.tzinfo is None:
            date = date.replace(tzinfo=UTC)
    raw_id = header.get("Message-ID")
    message_id = " ".join(str(raw_id).split()) if raw_id is not None else ""
    usable = message_id if message_id and message_id.isascii() else None
    return MessageHead(raw_id is not None, usable, date)
