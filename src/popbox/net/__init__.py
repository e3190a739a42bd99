"""The asyncio glue that serves the sans-I/O POP3 core over real sockets and TLS."""

from __future__ import annotations

from popbox.net.service import Pop3Service, bind_addresses, bind_sockets
from popbox.net.tls_context import ensure_self_signed_cert, make_server_context

__all__ = [
    "Pop3Service",
    "bind_addresses",
    "bind_sockets",
    "ensure_self_signed_cert",
    "make_server_context",
]
