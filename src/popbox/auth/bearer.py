"""Bearer tokens as credentials: who an OAuth 2.0 access token says its holder is.

``BearerVerifier.verify`` checks a token in one of three ways (``introspection_mode``,
named as in Dovecot's oauth2 settings):

- ``local``: the token is a JWT (RFC 7519) signed by the issuer; its signature is
  checked with the issuer's published keys (``issuer.KeySet``), then its issuer,
  audience and times. Microsoft Entra ID and Keycloak issue such tokens.
- ``post``: RFC 7662 token introspection: the issuer says whether the token is
  active and whose it is (Keycloak, Authentik, WSO2, any RFC 7662 server).
- ``get``: the token appended to a URL that answers with its claims, as Google's
  tokeninfo endpoint does.

A token is refused (``TokenRefused``) when it is malformed, unsigned, signed with an
algorithm or key we do not accept, expired, not yet valid, meant for another audience
or issued by another issuer, inactive, or names no user. An issuer that cannot be
asked raises ``AuthError``: the login fails as temporarily unavailable, never passes.
Which user a token names is its ``username_claim`` (Dovecot's ``username_attribute``,
``email`` by default), with a domain listed in ``domains`` taken off.
"""

from __future__ import annotations

import re
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import httpx
import jwt

from popbox.auth.issuer import (
    HTTP_TIMEOUT,
    JWKS_CACHE_SECONDS,
    JWKS_MIN_REFETCH_SECONDS,
    IssuerClient,
    KeySet,
    discovery_urls,
)
from popbox.errors import AuthError

__all__ = [
    "ALLOWED_ALGORITHMS",
    "CLOCK_SKEW",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_USERNAME_CLAIM",
    "MAX_TOKEN_LENGTH",
    "BearerSettings",
    "BearerVerifier",
    "IntrospectionMode",
    "TokenIdentity",
    "TokenRefused",
]

# Asymmetric signatures only: an HMAC (HS*) token would be checked with a key the
# issuer publishes, so anyone could sign one; "none" is no signature at all.
ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# What Entra ID and Google (RS256), Keycloak (RS256, ES256 on request) and modern
# issuers (EdDSA) sign with.
DEFAULT_ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")
# RFC 7519 section 4.1.4: "some small leeway, usually no more than a few minutes".
CLOCK_SKEW: Final = 60.0
# Entra ID tokens with group claims reach about 8 KiB; twice that bounds what we parse.
MAX_TOKEN_LENGTH: Final = 16 * 1024
# Dovecot's oauth2 username_attribute default.
DEFAULT_USERNAME_CLAIM: Final = "email"

IntrospectionMode: TypeAlias = Literal["local", "post", "get"]

# RFC 6750 section 2.1: b64token, what a bearer token may be on the wire.
_BEARER_TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Which kind of key each algorithm family verifies with (RFC 7518, RFC 8037).
_KEY_TYPES: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True, slots=True)
class BearerSettings:
    """How to check tokens; the ``[auth.oauth]`` table of popbox's config."""

    audience: tuple[str, ...]
    """Tokens must be meant for one of these (``aud``): a token another application
    obtained must never open a mailbox."""
    issuer: str = ""
    jwks_url: str = ""
    introspection_mode: IntrospectionMode = "local"
    introspection_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    username_claim: str = DEFAULT_USERNAME_CLAIM
    domains: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    clock_skew: float = CLOCK_SKEW
    jwks_cache_seconds: float = JWKS_CACHE_SECONDS
    jwks_min_refetch_seconds: float = JWKS_MIN_REFETCH_SECONDS
    timeout: float = HTTP_TIMEOUT
    ca_file: str | None = None
    scope: str = ""
    """The scope a client should ask for, told to clients whose token was refused."""

    def __post_init__(self) -> None:
        if not self.audience:
            raise ValueError("audience: name the audience tokens must be issued for")
        refused = sorted(set(self.algorithms) - ALLOWED_ALGORITHMS)
        if refused:
            raise ValueError(f"algorithms: {', '.join(refused)} not allowed (asymmetric only)")
        if self.introspection_mode == "local" and not self.issuer:
            raise ValueError("issuer: introspection_mode local needs the token issuer")
        if self.introspection_mode != "local" and not self.introspection_url:
            raise ValueError(f"introspection_url: needed by introspection_mode "
                             f"{self.introspection_mode}")


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """A token that passed every check: the user it names and who issued it."""

    username: str
    issuer: str


@dataclass(frozen=True, slots=True)
class TokenRefused:
    """A token that did not pass; ``reason`` is for the log only."""

    reason: str


class BearerVerifier:
    """Checks access tokens as ``BearerSettings`` says; shared by every session."""

    def __init__(
        self,
        settings: BearerSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._client = IssuerClient(
            timeout=settings.timeout, ca_file=settings.ca_file, transport=transport
        )
        self.keys = KeySet(
            self._client,
            issuer=settings.issuer,
            jwks_url=settings.jwks_url or None,
            cache_seconds=settings.jwks_cache_seconds,
            min_refetch_seconds=settings.jwks_min_refetch_seconds,
            clock=clock,
        )

    @property
    def openid_configuration(self) -> str:
        """The issuer's discovery URL, told to clients whose token was refused
        (RFC 7628 section 3.2.2); "" without an issuer."""
        return discovery_urls(self.settings.issuer)[0] if self.settings.issuer else ""

    async def verify(self, token: str) -> TokenIdentity | TokenRefused:
        """Who ``token`` names, or why it is refused; AuthError when its issuer (or
        introspection endpoint) cannot be asked."""
        if len(token) > MAX_TOKEN_LENGTH or not _BEARER_TOKEN.fullmatch(token):
            return TokenRefused("not a bearer token")
        mode = self.settings.introspection_mode
        if mode == "local":
            claims: Mapping[str, Any] | TokenRefused = await self._local(token)
        elif mode == "post":
            claims = await self._introspect(token)
        else:
            claims = await self._tokeninfo(token)
        if isinstance(claims, TokenRefused):
            return claims
        return self._identity(claims)

    # -- the three ways -------------------------------------------------------------

    async def _local(self, token: str) -> Mapping[str, Any] | TokenRefused:
        settings = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            return TokenRefused(f"not a JWT: {exc}")
        algorithm = header.get("alg")
        if algorithm not in settings.algorithms:
            return TokenRefused(f"algorithm {algorithm!r} not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return TokenRefused("malformed key id")
        key = await self.keys.key(kid)
        if key is None:
            return TokenRefused(f"the issuer publishes no key {kid!r}")
        if key.key_type != _KEY_TYPES.get(algorithm[:2]):
            return TokenRefused(f"a {key.key_type} key cannot check {algorithm}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=list(settings.audience),
                issuer=settings.issuer,
                leeway=settings.clock_skew,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            return TokenRefused(f"{type(exc).__name__}: {exc}")
        return claims

    async def _introspect(self, token: str) -> Mapping[str, Any] | TokenRefused:
        """RFC 7662 section 2: POST the token, authenticated as the resource server."""
        settings = self.settings
        auth = (settings.client_id, settings.client_secret) if settings.client_id else None
        url = settings.introspection_url
        status, document = await self._client.request(
            "POST", url, data={"token": token, "token_type_hint": "access_token"}, auth=auth
        )
        if status != 200 or not isinstance(document, dict):
            # An invalid token is "active": false with 200; anything else is the
            # endpoint refusing us (credentials, configuration): not the client's fault.
            raise AuthError(f"introspection {url}: HTTP {status}")
        if document.get("active") is not True:
            return TokenRefused("inactive (introspection)")
        return self._checked(document)

    async def _tokeninfo(self, token: str) -> Mapping[str, Any] | TokenRefused:
        """Dovecot's ``get`` mode: the token appended to the URL (Google's tokeninfo)."""
        url = self.settings.introspection_url
        status, document = await self._client.request(
            "GET", url + urllib.parse.quote(token, safe="")
        )
        if status in (400, 401, 403, 404):
            return TokenRefused(f"token info: HTTP {status}")
        if status != 200 or not isinstance(document, dict):
            raise AuthError(f"token info {url}: HTTP {status}")
        return self._checked(document)

    # -- claims ---------------------------------------------------------------------

    def _checked(self, claims: Mapping[str, Any]) -> Mapping[str, Any] | TokenRefused:
        """What PyJWT checks for a JWT, for claims an endpoint answered with."""
        settings = self.settings
        now = time.time()
        skew = settings.clock_skew
        exp, nbf, iat = (_number(claims.get(name)) for name in ("exp", "nbf", "iat"))
        if exp is not None and exp <= now - skew:
            return TokenRefused("expired")
        if (nbf is not None and nbf > now + skew) or (iat is not None and iat > now + skew):
            return TokenRefused("not yet valid")
        issuer = claims.get("iss")
        if settings.issuer and issuer is not None and issuer != settings.issuer:
            return TokenRefused(f"issued by {issuer!r}")
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or not set(settings.audience) & {
            value for value in audiences if isinstance(value, str)
        }:
            return TokenRefused(f"meant for {audience!r}")
        return claims

    def _identity(self, claims: Mapping[str, Any]) -> TokenIdentity | TokenRefused:
        settings = self.settings
        value = claims.get(settings.username_claim)
        if not isinstance(value, str) or not value:
            return TokenRefused(f"no {settings.username_claim} claim")
        value = unicodedata.normalize("NFC", value)  # as the login name is compared
        local, at, domain = value.rpartition("@")
        if at and domain.lower() in settings.domains:
            value = local
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            issuer = settings.issuer or urllib.parse.urlsplit(settings.introspection_url).netloc
        return TokenIdentity(value, issuer)


def _number(value: object) -> float | None:
    """A time claim: a number, or (Google's tokeninfo) a string of digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return float(value)
    return None
