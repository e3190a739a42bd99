"""The PROXY protocol (HAProxy, versions 1 and 2): the client's address behind a load balancer.

On a listener that ``pop3.proxy_protocol`` names, trust decides, per connection, as
Dovecot's ``haproxy_trusted_networks`` does:

* a peer in ``trusted_proxies`` (the load balancer) must start with a valid header,
  else it is dropped and logged; the session then sees the address the header names
  (for the log, the per-IP cap, auth penalties, ``allow_nets`` and
  plaintext-on-loopback). A v2 LOCAL header (HAProxy's health checks) or an UNKNOWN
  one leaves the balancer's own address;
* any other peer is a direct client: served as if the listener had no PROXY at all,
  except that a PROXY header from it is refused (the session answers ``-ERR``; before
  an implicit-TLS handshake, where there is no one to answer, the connection is only
  dropped and logged), so nobody can pass for someone else by sending one.

The header is read with exact-size reads (``asyncio.BufferedProtocol``) so that not
one byte past it is consumed: on an implicit-TLS listener the TLS handshake starts
right after the header, and its first bytes must reach the TLS layer intact.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from popbox.config_scale import TrustedProxies
from popbox.errors import ProtocolError

__all__ = [
    "PROXY_V1_MAX",
    "PROXY_V2_MAX_PAYLOAD",
    "HeaderRefusal",
    "ProxyAddress",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "looks_like_header",
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
# "PROXY" or the v2 signature's first five octets (with a NUL no mail client sends):
# enough to tell a header from a command or a TLS ClientHello (which starts 0x16 0x03),
# and read first, so that a peer that sends a short command is not kept waiting.
_SNIFF: Final = 5
# "PROXY UNKNOWN\r\n" is the shortest v1 header: reading this much of one never reads
# past it.
_FIRST_READ: Final = 15

_V2_LOCAL: Final = 0x20
_V2_PROXY: Final = 0x21
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21


def looks_like_header(data: bytes) -> bool:
    """Whether the first bytes of a connection are a PROXY header (of either version).

    Made for a peer that is not trusted: it decides on what arrived first, which from
    a balancer is the whole header in one segment.
    """
    return data.startswith((b"PROXY ", PROXY_V2_SIGNATURE[:_SNIFF]))


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
    """A PROXY listener's first protocol: reads exactly one header from a trusted
    proxy, then hands the transport on.

    A peer outside ``trusted`` is handed on at once to ``on_direct(transport)``, as
    a client of its own. From a trusted one, ``on_header(transport, address)`` is
    called once the header is complete (address None means "use the real peer"); a
    bad header or ``timeout`` seconds without one closes the connection.
    """

    def __init__(
        self,
        on_header: Callable[[asyncio.Transport, ProxyAddress | None], None],
        timeout: float,
        *,
        trusted: TrustedProxies,
        on_direct: Callable[[asyncio.Transport], None],
    ) -> None:
        self._on_header = on_header
        self._on_direct = on_direct
        self._trusted = trusted
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        # Made once the peer is known to be a proxy: a direct client needs none.
        self._view = memoryview(b"")
        self._have = 0
        self._want = _SNIFF
        self._fixed: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        stream = cast(asyncio.Transport, transport)
        peer = stream.get_extra_info("peername")
        if not peer or str(peer[0]) not in self._trusted:
            self._on_direct(stream)  # nothing read yet: the next protocol reads it all
            return
        self._transport = stream
        self._view = memoryview(bytearray(PROXY_V1_MAX + PROXY_V2_MAX_PAYLOAD))
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
        if data.startswith(PROXY_V2_SIGNATURE[:_SNIFF]):
            if self._have < PROXY_V2_FIXED:
                self._want = PROXY_V2_FIXED
                return False, None
            self._fixed = data[:PROXY_V2_FIXED]
            length = v2_payload_length(self._fixed)
            self._want = PROXY_V2_FIXED + length
            return length == 0, parse_v2(self._fixed, b"") if length == 0 else None
        if data.startswith(b"PROXY"):
            if self._have < _FIRST_READ:
                self._want = _FIRST_READ
                return False, None
            if data.startswith(b"PROXY ") and data.endswith(b"\r\n"):
                return True, parse_v1(data)
            if not data.startswith(b"PROXY ") or self._have >= PROXY_V1_MAX:
                raise ProxyHeaderError("malformed or overlong PROXY v1 line")
            # A v1 line's end cannot be predicted: one octet at a time, at most 92.
            self._want = self._have + 1
            return False, None
        # Five octets tell: a command (CAPA) or a ClientHello is no header.
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
            log.warning("PROXY protocol: %s (from trusted proxy %s)", why, _show(peer))
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


class HeaderRefusal(asyncio.Protocol):
    """Before an implicit-TLS handshake with a peer that is not a trusted proxy: a
    PROXY header from it is dropped and logged, anything else goes on to ``on_clean``.

    Only the first ``_SNIFF`` octets are looked at; they and the transport are handed
    on together, so the TLS layer sees the stream from its first byte. A peer that
    sends fewer within ``timeout`` seconds (the handshake's) is dropped.
    """

    def __init__(
        self, on_clean: Callable[[asyncio.Transport, bytes], None], timeout: float
    ) -> None:
        self._on_clean = on_clean
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._seen = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._seen += data
        if len(self._seen) < _SNIFF:
            return
        self._stop()
        if looks_like_header(self._seen):
            log.warning(
                "PROXY header from %s, which is not a trusted proxy: connection refused",
                _show(transport.get_extra_info("peername")),
            )
            transport.abort()
            return
        transport.pause_reading()
        self._on_clean(transport, self._seen)

    def eof_received(self) -> bool | None:
        self._stop()
        return None  # closes: a client gone before five octets is nobody's session

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()

    def _expired(self) -> None:
        self._timer = None
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()

    def _stop(self) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _show(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)
