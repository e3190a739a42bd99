"""Sans-I/O POP3: bytes in, events out; no asyncio, ssl, files or databases.

The server side is ``ServerConnection`` (docs/dev/server-api.md); ``WireEncoder`` and
``WireDecoder`` turn stored messages into RETR/TOP wire form and back.
"""

from __future__ import annotations

from popbox.proto.events import (
    FLUSH,
    NEED_DATA,
    ApopRequest,
    CloseConnection,
    ConnectionClosed,
    Event,
    Flush,
    LoginRequest,
    NeedData,
    Quit,
    Retrieve,
    SnapshotIndex,
    StartTls,
)
from popbox.proto.lines import MAX_COMMAND_LINE, MAX_SASL_LINE
from popbox.proto.sasl import apop_digest
from popbox.proto.server import (
    MAX_AUTH_FAILURES,
    MAX_BAD_COMMANDS,
    ServerConnection,
    ServerSettings,
)
from popbox.proto.snapshot import MessageLike
from popbox.proto.state import SessionState
from popbox.proto.wire import WireDecoder, WireEncoder

__all__ = [
    "FLUSH",
    "MAX_AUTH_FAILURES",
    "MAX_BAD_COMMANDS",
    "MAX_COMMAND_LINE",
    "MAX_SASL_LINE",
    "NEED_DATA",
    "ApopRequest",
    "CloseConnection",
    "ConnectionClosed",
    "Event",
    "Flush",
    "LoginRequest",
    "MessageLike",
    "NeedData",
    "Quit",
    "Retrieve",
    "ServerConnection",
    "ServerSettings",
    "SessionState",
    "SnapshotIndex",
    "StartTls",
    "WireDecoder",
    "WireEncoder",
    "apop_digest",
]
