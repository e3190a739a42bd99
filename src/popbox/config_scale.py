"""Settings for running past one machine: ``[postgresql]`` (mail, users and maildrop
leases in PostgreSQL) and the trusted load balancers in front (PROXY protocol),
validated with the rest of the configuration (popbox.config; docs/scale-out.md)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DUPLICATE_WINDOW",
    "LEASE_SECONDS",
    "POOL_MAX",
    "POOL_TIMEOUT",
    "PostgresSettings",
    "TrustedProxies",
    "check_trusted_proxies",
]

# A session's maildrop lease: long enough that a renewal every third of it survives a
# database failover (Patroni's default ttl is 30 s), short enough that a mailbox held
# by a node that died is usable again within a minute.
LEASE_SECONDS: Final = 60.0
# Connections per process: a session holds one only while a statement runs, so a few
# serve thousands of sessions; PostgreSQL's max_connections (100) bounds every node's
# pools together.
POOL_MAX: Final = 10
# How long a request waits for a free pooled connection (or a new one while the
# database is away) before the client gets [SYS/TEMP] or LMTP 451: well under the
# 10-minute POP3 and 5-minute SMTP timeouts of clients and MTAs.
POOL_TIMEOUT: Final = 10.0
# Postfix retries a deferred message for up to maximal_queue_lifetime (5 days): a
# retry of a delivery that was stored but whose reply was lost is recognised for as
# long. 0 turns the recognition off.
DUPLICATE_WINDOW: Final = 5 * 86400.0


class PostgresSettings(BaseModel):
    """``[postgresql]``: the database behind ``storage.backend`` and ``auth.backend``
    ``= "postgresql"``. popbox creates and upgrades its own tables at startup."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every table of the config

    dsn: str = Field(min_length=1)
    """A libpq connection string or URI (``postgresql://popbox@db.example/popbox``); a
    password is better kept in ``~/.pgpass`` or ``PGPASSFILE`` than here."""
    pool_min: int = Field(default=1, ge=0, le=1000)
    pool_max: int = Field(default=POOL_MAX, ge=1, le=1000)
    pool_timeout: float = Field(default=POOL_TIMEOUT, gt=0)
    """Seconds a request waits for a pooled connection before it fails with a
    temporary error (``-ERR [SYS/TEMP]``, LMTP 451)."""
    connect_timeout: int = Field(default=5, ge=1)
    """Seconds one connection attempt may take (libpq's ``connect_timeout``)."""
    lease_seconds: float = Field(default=LEASE_SECONDS, ge=1.0)
    """How long a maildrop lease lasts unless renewed; a session renews it every
    third of this. A node that dies frees its mailboxes after at most this long."""
    node_id: str = ""
    """This node's name in leases and logs; "" means the host name."""
    duplicate_window: float = Field(default=DUPLICATE_WINDOW, ge=0)
    """Seconds during which the same delivery (the same message for the same
    recipient, as an MTA retries it) is recognised and stored only once."""

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str) -> str:
        if value and (not value.isprintable() or len(value) > 64):
            raise ValueError("must be printable and at most 64 characters")
        return value

    def node(self) -> str:
        """``node_id``, or the host name when unset."""
        return self.node_id or socket.gethostname()[:64]


def check_trusted_proxies(values: list[str]) -> list[str]:
    """Each entry must be an address or network (``10.0.0.0/8``, ``::1``)."""
    for value in values:
        ipaddress.ip_network(value, strict=False)
    return values


class TrustedProxies:
    """``trusted_proxies`` parsed once: whether a connection's peer is a load balancer.

    Shared by the POP3 and LMTP listeners, which decide per connection whether its
    first bytes must be a PROXY header (a trusted peer) or may not be one (anyone else).
    """

    __slots__ = ("_networks",)

    def __init__(self, values: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(value, strict=False) for value in values)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, host: object) -> bool:
        """``host`` is a peer address as sockets report it (``::ffff:a.b.c.d`` and
        ``fe80::1%eth0`` included); anything unparsable (a unix socket) is not trusted."""
        if not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 balancer seen on a dual-stack socket
        return any(address in network for network in self._networks)
