"""The events a ``ClientConnection`` hands to the collector: the server's replies, parsed.

``NEED_DATA`` and ``ConnectionClosed`` are the server side's (popbox.proto.events):
they mean the same whichever side reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

from popbox.proto.events import NEED_DATA, ConnectionClosed, NeedData

__all__ = [
    "NEED_DATA",
    "Capabilities",
    "ConnectionClosed",
    "Continuation",
    "ErrReply",
    "Event",
    "Greeting",
    "MessageData",
    "MessageEnd",
    "NeedData",
    "OkReply",
    "ScanListing",
    "StatReply",
    "UidListing",
]


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's ``+OK`` greeting; ``apop_timestamp`` when it offers APOP."""

    text: str
    apop_timestamp: str | None


@dataclass(frozen=True, slots=True)
class OkReply:
    """A single-line ``+OK``; for RETR/TOP it opens the body (MessageData follows)."""

    command: str
    text: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class ErrReply:
    """``-ERR``; ``code`` is the RFC 2449/3206 response code (IN-USE, SYS/TEMP, ...)."""

    command: str
    text: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Continuation:
    """A SASL challenge (``+ base64``), decoded. The AUTH reply is still pending."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Capabilities:
    """CAPA: capability name (upper case) -> its arguments."""

    items: Mapping[str, tuple[str, ...]]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.upper() in self.items

    def sasl_mechanisms(self) -> frozenset[str]:
        return frozenset(arg.upper() for arg in self.items.get("SASL", ()))


@dataclass(frozen=True, slots=True)
class StatReply:
    """STAT: messages in the maildrop and their total size in octets."""

    count: int
    size: int


@dataclass(frozen=True, slots=True)
class ScanListing:
    """LIST without argument: (message number, size) in server order."""

    entries: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class UidListing:
    """UIDL without argument: (message number, unique-id) in server order.

    ``problems`` lists what was wrong with the unique-ids (invalid characters or
    length, duplicates); the collector then falls back to header hashes.
    """

    entries: tuple[tuple[int, str], ...]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageData:
    """A chunk of a RETR/TOP body, un-dot-stuffed, CRLF line ends as sent."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The end of the RETR/TOP body of message ``number``."""

    command: str
    number: int


Event: TypeAlias = (
    Greeting
    | OkReply
    | ErrReply
    | Continuation
    | Capabilities
    | StatReply
    | ScanListing
    | UidListing
    | MessageData
    | MessageEnd
    | ConnectionClosed
)
"""A reply event; ``next_event`` returns one of these or ``NEED_DATA``."""
