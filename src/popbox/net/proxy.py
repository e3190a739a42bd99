"""The PROXY protocol (HAProxy, versions 1 and 2): the client's address behind a load balancer.

With ``pop3.proxy_protocol`` on, every connection must start with a PROXY header; the
session then sees the address it names (for the per-IP cap, plaintext-on-loopback and
the log). The header is read with exact-size reads (``asyncio.BufferedProtocol``) so
that not one byte past it is consumed: on an implicit-TLS listener the TLS handshake
starts right after the header, and its first bytes must reach the TLS layer intact.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from popbox.errors import ProtocolError

__all__ = [
    "PROXY_V1_MAX",
    "PROXY_V2_MAX_PAYLOAD",
    "ProxyAddress",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "parse_v1",
    "parse_v2",
]

log = logging.getLogger("popbox.pop3")

# Section 2.1: a v1 line is at most 107 octets including CRLF.
PROXY_V1_MAX: Final = 107
# Section 2.2: the fixed part of v2 (signature, version/command, family, length).
PROXY_V2_FIXED: Final = 16
PROXY_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# The v2 length field allows 64 KiB; HAProxy's TLVs (ALPN, authority, unique-id, SSL
# details) stay well under 1 KiB, so a peer sending more is not a load balancer.
PROXY_V2_MAX_PAYLOAD: Final = 4096
# "PROXY UNKNOWN\r\n" is the shortest v1 header: reading this much first never reads
# past a header of either version.
_FIRST_READ: Final = 15

_V2_LOCAL: Final = 0x20
_V2_PROXY: Final = 0x21
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21


class ProxyHeaderError(ProtocolError):
    """The connection did not start with a valid PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyAddress:
    """The original client's address and port, as the load balancer saw them."""

    host: str
    port: int


def parse_v1(line: bytes) -> ProxyAddress | None:
    """Parse a v1 line (with its CRLF). None for ``UNKNOWN``: use the real peer."""
    if not line.startswith(b"PROXY ") or not line.endswith(b"\r\n"):
        raise ProxyHeaderError("not a PROXY v1 line")
    if len(line) > PROXY_V1_MAX:
        raise ProxyHeaderError("PROXY v1 line too long")
    fields = line[6:-2].split(b" ")
    if fields[0] == b"UNKNOWN":
        return None
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(fields[1].decode("ascii"))
        ipaddress.ip_address(fields[2].decode("ascii"))
        port = _port(fields[3])
        _port(fields[4])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProxyHeaderError(f"malformed PROXY v1 address: {exc}") from exc
    if source.version != (4 if fields[0] == b"TCP4" else 6):
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    return ProxyAddress(str(source), port)


def _port(text: bytes) -> int:
    # Section 2.1: decimal without leading zeros, 0-65535.
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")):
        raise ValueError(f"bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise ValueError(f"bad port {port}")
    return port


def v2_payload_length(fixed: bytes) -> int:
    """Check the 16-octet fixed part of a v2 header; return the payload length."""
    if len(fixed) != PROXY_V2_FIXED or not fixed.startswith(PROXY_V2_SIGNATURE):
        raise ProxyHeaderError("not a PROXY v2 header")
    if fixed[12] not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"unsupported PROXY v2 version/command {fixed[12]:#x}")
    (length,) = struct.unpack("!H", fixed[14:16])
    if length > PROXY_V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 payload of {length} octets is too long")
    return int(length)


def parse_v2(fixed: bytes, payload: bytes) -> ProxyAddress | None:
    """Parse a v2 header. None for LOCAL (health checks) and non-TCP families."""
    v2_payload_length(fixed)
    if fixed[12] == _V2_LOCAL:
        return None
    family = fixed[13]
    if family == _V2_TCP4:
        if len(payload) < 12:
            raise ProxyHeaderError("PROXY v2 TCP4 payload too short")
        source = ipaddress.IPv4Address(payload[0:4])
        (port,) = struct.unpack("!H", payload[8:10])
    elif family == _V2_TCP6:
        if len(payload) < 36:
            raise ProxyHeaderError("PROXY v2 TCP6 payload too short")
        source6 = ipaddress.IPv6Address(payload[0:16])
        # An IPv4 client behind an IPv6 balancer: treat it as the IPv4 address it is.
        mapped = source6.ipv4_mapped
        (port,) = struct.unpack("!H", payload[32:34])
        return ProxyAddress(str(mapped or source6), int(port))
    else:
        # UNSPEC, UDP and unix sockets carry no TCP client address: use the real peer.
        return None
    return ProxyAddress(str(source), int(port))


class ProxyHeaderReader(asyncio.BufferedProtocol):
    """Reads exactly one PROXY header, then hands the transport on.

    ``on_header(transport, address)`` is called once the header is complete (address
    None means "use the real peer"); a bad header or ``timeout`` seconds without one
    closes the connection.
    """

    def __init__(
        self,
        on_header: Callable[[asyncio.Transport, ProxyAddress | None], None],
        timeout: float,
    ) -> None:
        self._on_header = on_header
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray(PROXY_V1_MAX + PROXY_V2_MAX_PAYLOAD)
        self._view = memoryview(self._buffer)
        self._have = 0
        self._want = _FIRST_READ
        self._fixed: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never more than the header still needs: the bytes after it are not ours.
        return self._view[self._have : self._want]

    def buffer_updated(self, nbytes: int) -> None:
        self._have += nbytes
        if self._have < self._want:
            return
        try:
            complete, address = self._advance()
        except ProxyHeaderError as exc:
            self._fail(str(exc))
            return
        if complete:
            self._done(address)

    def _advance(self) -> tuple[bool, ProxyAddress | None]:
        """Consume what has arrived: (True, address) when done, else raise ``_want``."""
        data = bytes(self._view[: self._have])
        if self._fixed is not None:
            return True, parse_v2(self._fixed, data[PROXY_V2_FIXED:])
        if data.startswith(b"PROXY "):
            if data.endswith(b"\r\n"):
                return True, parse_v1(data)
            if self._have >= PROXY_V1_MAX:
                raise ProxyHeaderError("PROXY v1 line too long")
            # A v1 line's end cannot be predicted: one octet at a time, at most 92.
            self._want = self._have + 1
            return False, None
        if data.startswith(PROXY_V2_SIGNATURE):
            if self._have < PROXY_V2_FIXED:
                self._want = PROXY_V2_FIXED
                return False, None
            self._fixed = data[:PROXY_V2_FIXED]
            length = v2_payload_length(self._fixed)
            self._want = PROXY_V2_FIXED + length
            return length == 0, parse_v2(self._fixed, b"") if length == 0 else None
        raise ProxyHeaderError("the connection did not start with a PROXY header")

    def eof_received(self) -> bool | None:
        self._fail("connection closed before the PROXY header")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def _expired(self) -> None:
        self._timer = None
        self._fail("no PROXY header in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, why: str) -> None:
        self._cancel_timer()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            peer = transport.get_extra_info("peername")
            log.warning("PROXY protocol: %s (from %s)", why, peer)
            transport.abort()

    def _done(self, address: ProxyAddress | None) -> None:
        self._cancel_timer()
        transport = self._transport
        assert transport is not None
        self._transport = None
        # Not one read more into this protocol's buffer (uvloop asks for the next buffer
        # in the same callback); whoever takes the transport resumes reading.
        transport.pause_reading()
        self._on_header(transport, address)
