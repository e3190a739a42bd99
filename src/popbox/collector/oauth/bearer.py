"""What every token source shares: the bearer-token check, the cached token, error
excerpts, and the error that says which command signs a dead login in again.

A provider caches the access token until shortly before it expires and asks its
source again when the cache is stale or the server rejected the token.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from typing import Final

from popbox.errors import CollectorError, OAuthLoginRequired

__all__ = [
    "DEFAULT_TOKEN_LIFETIME",
    "ERROR_EXCERPT_CHARS",
    "EXPIRY_MARGIN",
    "SIGN_IN_COMMAND",
    "CachedToken",
    "check_bearer_token",
    "login_required",
    "sign_in_command",
]

# Renew this long before "expires_in" runs out: clock skew plus a slow login.
EXPIRY_MARGIN: Final = 120.0
# When a server omits expires_in, RFC 6749 leaves the lifetime open; an hour is what
# Microsoft and Google issue, and force_refresh covers a shorter real lifetime.
DEFAULT_TOKEN_LIFETIME: Final = 3600.0
# Enough of an error to diagnose; tokens endpoints echo no secrets in errors.
ERROR_EXCERPT_CHARS: Final = 300

SIGN_IN_COMMAND: Final = "popbox oauth login"

# RFC 6750 section 2.1 b64token, the shape of every bearer token we can send in SASL.
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


def check_bearer_token(token: str, source: str) -> str:
    """``token`` if it has a bearer token's shape; else CollectorError naming ``source``."""
    if not _BEARER_TOKEN.match(token):
        raise CollectorError(f"{source} did not return a bearer token")
    return token


def sign_in_command(account: str, sink: str | None = None) -> str:
    """The command that signs ``account``'s POP3 login (or ``sink``'s) in again."""
    command = f"{SIGN_IN_COMMAND} {shlex.quote(account)}"
    return command if sink is None else f"{command} --sink {shlex.quote(sink)}"


def login_required(what: str, why: str, sign_in: str) -> OAuthLoginRequired:
    """The error of a login only a new sign-in can mend; it names the command."""
    return OAuthLoginRequired(f"{what}: {why}: run `{sign_in}`")


@dataclass(frozen=True, slots=True)
class CachedToken:
    """An access token and the wall-clock time at which to fetch a new one."""

    token: str
    renew_at: float

    def fresh(self) -> bool:
        return time.time() < self.renew_at

    @classmethod
    def from_response(cls, token: str, expires_in: object, source: str) -> CachedToken:
        """The token of a token endpoint's answer, renewed ``EXPIRY_MARGIN`` before
        its ``expires_in`` (checked, so a malformed token never reaches the server)."""
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else None
        if lifetime is None and isinstance(expires_in, str) and expires_in.isdigit():
            lifetime = float(expires_in)  # some servers send the number as a string
        lifetime = DEFAULT_TOKEN_LIFETIME if lifetime is None else lifetime
        return cls(check_bearer_token(token, source), time.time() + lifetime - EXPIRY_MARGIN)
