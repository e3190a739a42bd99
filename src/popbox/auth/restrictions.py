"""The login restrictions of Dovecot's password database extra fields, for one login.

Applied after the password was found right, by whoever knows the client's address
(the login broker):

    allow_nets=NET,...     the client's address must be in one of the networks
                           (Dovecot: checked against the remote client address)
    allow_real_nets=...    the same for the connection's own peer (a proxy in front)
    nologin [reason=TEXT]  never logs in; the reason is the -ERR text
    proxy, proxy_maybe,    Dovecot proxies or refers these logins elsewhere; popbox
    host=HOST              does neither, so it refuses them and says why in the log

A network is an address or ``ADDR/PREFIX`` (IPv4 or IPv6; an IPv4-mapped IPv6
client address is compared as IPv4, as Dovecot does). A field popbox cannot read
(a malformed network) refuses the login rather than let in whom Dovecot would not.
``nopassword`` (any password will do) is the passwd file's business: it is honoured
only beside ``allow_nets`` (auth.passwdfile).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "NET_FIELDS",
    "NOT_SERVED_FIELDS",
    "LoginRefusal",
    "RefusalKind",
    "check_networks",
    "login_refusal",
]

# Checked against the client's address, and against the connection's peer.
NET_FIELDS: Final = ("allow_nets", "allow_real_nets")
# Fields that send Dovecot's login elsewhere (a proxy, a referral): not served here.
NOT_SERVED_FIELDS: Final = ("proxy", "proxy_maybe", "host")
# Dovecot's keyword for connections that have no IP address (a unix socket).
LOCAL_KEYWORD: Final = "local"
# How many networks one field may list: a line of the passwd file, not a database.
MAX_NETWORKS: Final = 256
# The most of nologin's reason= that goes into the -ERR line: RFC 2449 bounds a
# response line at 512 octets, and the code and the line end need some of them.
MAX_REASON: Final = 200

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RefusalKind(enum.Enum):
    """How a refused login is answered."""

    AS_WRONG_PASSWORD = "as a wrong password"  # noqa: S105 - a kind, not a password
    """allow_nets: the same -ERR [AUTH], failure delay and penalty as a wrong password."""
    NOLOGIN = "nologin"
    """The password was right: -ERR [AUTH] with the reason, if the field gives one."""
    NOT_SERVED = "not served here"
    """proxy/host: the account is meant to be served elsewhere; a permanent refusal."""


@dataclass(frozen=True, slots=True)
class LoginRefusal:
    kind: RefusalKind
    field: str
    """The extra field that refused the login, for the log."""
    detail: str = ""
    """For the log: what the field holds and what did not match."""
    reason: str = ""
    """nologin's ``reason=``, sent to the client ("" for the standard text)."""


@functools.lru_cache(maxsize=1024)
def check_networks(text: str) -> tuple[Network, ...]:
    """The networks of an allow_nets value (``local`` adds none); ValueError if one
    cannot be read."""
    networks: list[Network] = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) > MAX_NETWORKS:
        raise ValueError(f"more than {MAX_NETWORKS} networks")
    for item in items:
        if item == LOCAL_KEYWORD:
            continue
        networks.append(ipaddress.ip_network(item, strict=False))
    return tuple(networks)


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _outside(field: str, text: str, ip: str | None) -> LoginRefusal | None:
    """A refusal if ``ip`` is in none of the networks ``text`` lists."""
    try:
        networks = check_networks(text)
    except ValueError as exc:
        return LoginRefusal(RefusalKind.AS_WRONG_PASSWORD, field, f"unreadable: {exc}")
    address = _address(ip) if ip is not None else None
    if address is not None and networks and any(address in net for net in networks):
        return None
    if address is None and ip is not None and LOCAL_KEYWORD in text.split(","):
        return None  # no IP address at all (a unix socket), as Dovecot's 'local'
    shown = ip if ip is not None else "unknown"
    return LoginRefusal(RefusalKind.AS_WRONG_PASSWORD, field, f"{shown} is not in {text}")


def _printable(text: str) -> str:
    """The reason as it may go on the wire: printable ASCII, one line, bounded."""
    return "".join(char for char in text if " " <= char <= "~")[:MAX_REASON].strip()


def login_refusal(
    extra: Mapping[str, str], *, ip: str, real_ip: str | None
) -> LoginRefusal | None:
    """Why a user with these extra fields may not log in from ``ip``; None if they may.

    ``real_ip`` is the connection's own peer (None when unknown, e.g. behind a PROXY
    header the broker was not given the peer of: allow_real_nets then refuses).
    """
    if "allow_nets" in extra:
        refusal = _outside("allow_nets", extra["allow_nets"], ip)
        if refusal is not None:
            return refusal
    if "allow_real_nets" in extra:
        refusal = _outside("allow_real_nets", extra["allow_real_nets"], real_ip)
        if refusal is not None:
            return refusal
    for field in NOT_SERVED_FIELDS:
        if field in extra:
            value = extra[field]
            return LoginRefusal(
                RefusalKind.NOT_SERVED,
                field,
                f"{field}={value}: popbox does not proxy or refer logins"
                if value
                else f"{field}: popbox does not proxy or refer logins",
            )
    if "nologin" in extra:
        reason = _printable(extra.get("reason", ""))
        return LoginRefusal(RefusalKind.NOLOGIN, "nologin", reason=reason)
    return None
