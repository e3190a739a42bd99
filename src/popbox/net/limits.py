"""Abuse limits shared by all sessions of a service: the per-IP auth penalty and caps.

The penalty follows Dovecot's auth_penalty: each failed login from an address doubles
the wait before that address's next login is even checked (2, 4, 8 ... seconds, up to
a cap), so a guesser gets a few tries a minute however many connections it opens.
A success from the address clears it, as in Dovecot. The table is bounded: entries
decay after ``PENALTY_DECAY`` seconds and the oldest go first past ``PENALTY_MAX_IPS``.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = [
    "PENALTY_DECAY",
    "PENALTY_INITIAL",
    "PENALTY_IPV6_PREFIX",
    "PENALTY_MAX_IPS",
    "AuthPenalty",
    "penalty_key",
]

# Dovecot's AUTH_PENALTY_INIT_SECS: the wait after the first failure.
PENALTY_INITIAL: Final = 2.0
# Dovecot's AUTH_PENALTY_TIMEOUT: an address quiet for an hour starts afresh.
PENALTY_DECAY: Final = 3600.0
# At ~150 bytes an entry, 100,000 addresses are ~15 MiB: a botnet spraying guesses
# cannot grow the table without bound, and losing its oldest entries costs only delay.
PENALTY_MAX_IPS: Final = 100_000
# One IPv6 customer gets a /64: penalising single addresses would cost them nothing.
PENALTY_IPV6_PREFIX: Final = 64
# Doubling stops here; 2**10 seconds is far past any sensible cap already.
_MAX_DOUBLINGS: Final = 10


def penalty_key(host: str) -> str:
    """The address a penalty is kept for: the IPv4 address, or the IPv6 /64."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, PENALTY_IPV6_PREFIX), strict=False)
        return str(network)
    return str(address)


class AuthPenalty:
    """Failed logins per address, turned into a wait before the next login."""

    def __init__(
        self,
        cap: float,
        *,
        initial: float = PENALTY_INITIAL,
        decay: float = PENALTY_DECAY,
        max_entries: int = PENALTY_MAX_IPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cap = cap
        self._initial = initial
        self._decay = decay
        self._max_entries = max_entries
        self._clock = clock
        # key -> (failures, time of the last failure); oldest update first.
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def delay(self, host: str) -> float:
        """Seconds to wait before checking a login from ``host``; 0.0 when none."""
        if self._cap <= 0 or not self._entries:
            return 0.0  # nobody has failed lately: no address to work out
        key = penalty_key(host)
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        failures, last = entry
        if self._clock() - last >= self._decay:
            del self._entries[key]
            return 0.0
        doublings = min(failures - 1, _MAX_DOUBLINGS)
        return min(self._initial * float(2**doublings), self._cap)

    def failed(self, host: str) -> None:
        """Count a failed login from ``host``."""
        if self._cap <= 0:
            return
        key = penalty_key(host)
        now = self._clock()
        failures, last = self._entries.pop(key, (0, now))
        if now - last >= self._decay:
            failures = 0
        self._entries[key] = (min(failures + 1, _MAX_DOUBLINGS + 1), now)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def succeeded(self, host: str) -> None:
        """A good login from ``host`` clears its penalty (Dovecot does the same)."""
        if self._entries:
            self._entries.pop(penalty_key(host), None)
