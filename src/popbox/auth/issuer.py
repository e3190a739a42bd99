"""Talking to a token issuer over HTTP: bounded JSON requests and the JWKS key cache.

Every request has one deadline for the whole exchange (``HTTP_TIMEOUT``) and every
answer is read up to ``MAX_HTTP_RESPONSE`` octets, so a slow or hostile issuer can
hold a login only briefly and cost little memory. An issuer that cannot be asked is
an ``AuthError``: the login it was checking fails with ``[SYS/TEMP]``, never passes.

``KeySet`` keeps the issuer's signing keys (JWKS, RFC 7517): fetched on first use,
again when ``cache_seconds`` have passed, and once more when a token names a key id
it does not know (the issuer rotated its keys) — at most once per
``min_refetch_seconds``, so tokens with made-up key ids cannot make us hammer it.
Logins that need keys while a fetch runs wait for it and share its outcome, a
failure too: a slow issuer costs them one timeout, not one each in turn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import jwt

from popbox.errors import AuthError

__all__ = [
    "HTTP_TIMEOUT",
    "JWKS_CACHE_SECONDS",
    "JWKS_MIN_REFETCH_SECONDS",
    "MAX_HTTP_RESPONSE",
    "IssuerClient",
    "KeySet",
    "discovery_urls",
]

log = logging.getLogger("popbox.auth")

# A client waits on this during its login; an issuer slower than this is treated as
# down ([SYS/TEMP]) rather than holding login slots (Dovecot's login timeout is 60 s).
HTTP_TIMEOUT: Final = 5.0
# Microsoft's and Google's JWKS and discovery documents are a few KiB; a quarter of a
# MiB leaves room for any real one and bounds what a hostile endpoint can make us hold.
MAX_HTTP_RESPONSE: Final = 256 * 1024
# Issuers rotate keys over days and publish new ones ahead of use; an hour's cache
# (what Microsoft's and Google's Cache-Control give) follows a rotation soon enough.
JWKS_CACHE_SECONDS: Final = 3600.0
# An unknown key id refetches the JWKS at most this often: a rotation is picked up
# at once, a flood of made-up key ids costs the issuer one request a minute.
JWKS_MIN_REFETCH_SECONDS: Final = 60.0
# RFC 7517 sets no bound; real issuers publish a handful of keys.
MAX_KEYS: Final = 100


def discovery_urls(issuer: str) -> tuple[str, str]:
    """Where an issuer's metadata lives: OpenID Connect Discovery 1.0 section 4
    (``{issuer}/.well-known/openid-configuration``) and RFC 8414 section 3 (the
    well-known segment between the host and the issuer's path)."""
    base = issuer.rstrip("/")
    parts = urllib.parse.urlsplit(base)
    rfc8414 = urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + parts.path,
         "", "")
    )
    return f"{base}/.well-known/openid-configuration", rfc8414


class IssuerClient:
    """Bounded HTTP requests to an issuer, with JSON answers.

    A client is made per request over one shared SSLContext, so nothing is left open
    between logins and nothing needs closing at shutdown.
    """

    def __init__(
        self,
        *,
        timeout: float = HTTP_TIMEOUT,
        ca_file: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._transport = transport

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """``(status, parsed JSON or None)``; AuthError when the issuer cannot be
        reached in time, answers too much, or answers 5xx."""
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await self._fetch(method, url, data, auth, headers)
        except TimeoutError as exc:
            raise AuthError(f"{url}: no answer within {self._timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise AuthError(f"{url}: {type(exc).__name__}: {exc}") from exc
        if status >= 500:
            raise AuthError(f"{url}: HTTP {status}")
        try:
            document = json.loads(body) if body else None
        except ValueError:
            document = None
        return status, document

    async def _fetch(
        self,
        method: str,
        url: str,
        data: Mapping[str, str] | None,
        auth: tuple[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> tuple[int, bytes]:
        async with (
            httpx.AsyncClient(
                timeout=self._timeout, verify=self._ssl, transport=self._transport,
                follow_redirects=False,
            ) as client,
            client.stream(
                method, url, data=data, auth=auth,
                headers={"Accept": "application/json", **(headers or {})},
            ) as response,
        ):
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_HTTP_RESPONSE:
                    raise AuthError(f"{url}: answer longer than {MAX_HTTP_RESPONSE} octets")
            return response.status_code, bytes(body)

    async def json_object(self, url: str) -> dict[str, Any]:
        """GET ``url``: a JSON object answered with 200, else AuthError."""
        status, document = await self.request("GET", url)
        if status != 200 or not isinstance(document, dict):
            raise AuthError(f"{url}: HTTP {status}, not a JSON object")
        return document


class KeySet:
    """An issuer's signing keys by key id, fetched and refetched as the module says.

    ``jwks_url`` None: found from the issuer's metadata (``discovery_urls``), whose
    ``issuer`` must be the configured one (OpenID Connect Discovery section 4.3).
    """

    def __init__(
        self,
        client: IssuerClient,
        *,
        issuer: str,
        jwks_url: str | None,
        cache_seconds: float = JWKS_CACHE_SECONDS,
        min_refetch_seconds: float = JWKS_MIN_REFETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._issuer = issuer
        self._jwks_url = jwks_url
        self._cache_seconds = cache_seconds
        self._min_refetch = min_refetch_seconds
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._refetched_at: float | None = None
        self._lock = asyncio.Lock()
        self._finished = 0
        """Fetches that ended, well or not (not cancelled): a login that saw this
        change while it waited for the lock waited for a fetch."""
        self._failure: AuthError | None = None
        """Why the last fetch failed; None once one succeeds."""

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key named ``kid`` (None: the only key, if there is one); None when the
        issuer does not publish it. AuthError when the issuer cannot be asked."""
        finished = self._finished
        async with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at >= self._cache_seconds
            if stale and self._failure is not None and self._finished != finished:
                # The fetch this login waited for failed: asking again at once would
                # make every waiting login pay the issuer's timeout in turn.
                raise AuthError(str(self._failure)) from self._failure
            if stale:
                await self._fetch()
            found = self._find(kid)
            if found is None and not stale and (
                self._refetched_at is None or now - self._refetched_at >= self._min_refetch
            ):
                # A key id we do not know: the issuer may have rotated its keys.
                self._refetched_at = now
                await self._fetch()
                found = self._find(kid)
            return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        try:
            await self._fetch_keys()
        except AuthError as exc:
            self._failure = exc
            self._finished += 1
            raise
        self._failure = None
        self._finished += 1

    async def _fetch_keys(self) -> None:
        url = self._jwks_url or await self._discover()
        document = await self._client.json_object(url)
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise AuthError(f"{url}: no keys in the JWKS")
        keys: dict[str | None, jwt.PyJWK] = {}
        for entry in entries[:MAX_KEYS]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                # One key of an algorithm we do not know must not hide the others.
                log.debug("JWKS %s: key %r skipped: %s", url, entry.get("kid"), exc)
                continue
            kid = entry.get("kid")
            keys[kid if isinstance(kid, str) else None] = key
        self._keys = keys
        self._fetched_at = self._clock()
        log.info("fetched %d signing keys of %s from %s", len(keys), self._issuer, url)

    async def _discover(self) -> str:
        failure: AuthError | None = None
        for url in discovery_urls(self._issuer):
            try:
                metadata = await self._client.json_object(url)
            except AuthError as exc:
                failure = exc
                continue
            if metadata.get("issuer") != self._issuer:
                raise AuthError(f"{url}: names the issuer {metadata.get('issuer')!r}")
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri:
                raise AuthError(f"{url}: no jwks_uri")
            self._jwks_url = jwks_uri
            return jwks_uri
        assert failure is not None
        raise failure
