"""Microsoft 365 through msal: delegated and app-only token providers, and the device login.

Entra ID's details (authority discovery, token cache format, refresh token rotation)
are msal's to keep right, so Microsoft goes through msal rather than plain RFC 6749
requests. Importing this module imports msal; only Microsoft accounts do.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msal
import requests  # msal's own HTTP library, so a dependency already

from popbox.collector.config import OAuthSettings
from popbox.collector.oauth.bearer import ERROR_EXCERPT_CHARS, check_bearer_token
from popbox.collector.oauth.flows import HTTP_TIMEOUT
from popbox.collector.oauth.tokenfile import TokenFile
from popbox.errors import CollectorError

__all__ = [
    "MICROSOFT_AUTHORITY_HOST",
    "MsalClientCredentialsProvider",
    "MsalRefreshTokenProvider",
    "authority_of",
    "msal_device_login",
]

MICROSOFT_AUTHORITY_HOST: Final = "https://login.microsoftonline.com"
# msal adds these itself and refuses them in a scope list.
MSAL_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access"})


def authority_of(oauth: OAuthSettings) -> str:
    """The authority URL: ``authority`` as configured, else the tenant's at Microsoft."""
    return (oauth.authority or f"{MICROSOFT_AUTHORITY_HOST}/{oauth.tenant}").rstrip("/")


def _msal_scopes(scopes: Sequence[str]) -> list[str]:
    return [scope for scope in scopes if scope not in MSAL_RESERVED_SCOPES]


def _msal_options(authority: str, ca_file: Path | None) -> dict[str, Any]:
    """msal keyword arguments: a non-Microsoft authority host (a test or private
    endpoint) is used as given, without asking login.microsoftonline.com about it."""
    options: dict[str, Any] = {"authority": authority}
    if not authority.startswith(MICROSOFT_AUTHORITY_HOST + "/"):
        options.update(instance_discovery=False, validate_authority=False)
    if ca_file is None:
        options["timeout"] = HTTP_TIMEOUT
        return options
    session = requests.Session()
    # requests lets REQUESTS_CA_BUNDLE override Session.verify (msal's ``verify``
    # option); a verify given with each request is the one setting it cannot override.
    session.request = functools.partial(  # type: ignore[method-assign]
        session.request, verify=str(ca_file), timeout=HTTP_TIMEOUT
    )
    session.mount("https://", requests.adapters.HTTPAdapter(max_retries=1))
    options["http_client"] = session
    return options


def _msal_result(result: dict[str, Any] | None, what: str) -> str:
    if not result or "access_token" not in result:
        result = result or {}
        code = result.get("error", "no_token")
        detail = str(result.get("error_description", ""))[:ERROR_EXCERPT_CHARS]
        raise CollectorError(f"{what} failed: {code} {detail}".rstrip())
    return check_bearer_token(str(result["access_token"]), what)


class MsalRefreshTokenProvider:
    """Microsoft delegated access: msal's cache from ``popbox oauth login``."""

    def __init__(
        self,
        token_file: TokenFile,
        *,
        client_id: str,
        authority: str,
        scopes: Sequence[str],
        ca_file: Path | None = None,
    ) -> None:
        self._file = token_file
        self._scopes = _msal_scopes(scopes)
        self._cache = msal.SerializableTokenCache()
        self._app = msal.PublicClientApplication(
            client_id, token_cache=self._cache, **_msal_options(authority, ca_file)
        )
        self._loaded = False
        self._lock = asyncio.Lock()

    def _acquire(self, force_refresh: bool) -> str:
        if not self._loaded:
            stored = self._file.load() or {}
            if isinstance(stored.get("msal_cache"), str):
                self._cache.deserialize(stored["msal_cache"])
            self._loaded = True
        accounts = self._app.get_accounts()
        if not accounts:
            raise CollectorError(f"no login stored in {self._file.path}: run `popbox oauth login`")
        result = self._app.acquire_token_silent_with_error(
            self._scopes, account=accounts[0], force_refresh=force_refresh
        )
        if self._cache.has_state_changed:
            # msal rotated the refresh token; losing it would force a new login.
            self._file.save({"format": "msal", "msal_cache": self._cache.serialize()})
            self._cache.has_state_changed = False
        return _msal_result(result, "Microsoft token refresh")

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            # msal is synchronous (requests); its own cache answers until near expiry.
            return await asyncio.to_thread(self._acquire, force_refresh)


class MsalClientCredentialsProvider:
    """Microsoft 365 app-only access (POP.AccessAsApp) with a client secret."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        authority: str,
        scopes: Sequence[str] = ("https://outlook.office365.com/.default",),
        ca_file: Path | None = None,
    ) -> None:
        self._scopes = list(scopes)
        self._app = msal.ConfidentialClientApplication(
            client_id, client_credential=client_secret, **_msal_options(authority, ca_file)
        )
        self._lock = asyncio.Lock()

    def _acquire(self, force_refresh: bool) -> str:
        if force_refresh:
            self._app.remove_tokens_for_client()  # else msal answers from its cache
        result = self._app.acquire_token_for_client(scopes=self._scopes)
        return _msal_result(result, "Microsoft client credentials")

    async def token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            return await asyncio.to_thread(self._acquire, force_refresh)


def msal_device_login(
    oauth: OAuthSettings,
    token_file: TokenFile,
    echo: Callable[[str], None],
    *,
    ca_file: Path | None = None,
) -> None:
    """Microsoft device-code login with msal; stores msal's cache in ``token_file``."""
    cache = msal.SerializableTokenCache()
    app = msal.PublicClientApplication(
        oauth.client_id, token_cache=cache, **_msal_options(authority_of(oauth), ca_file)
    )
    flow = app.initiate_device_flow(scopes=_msal_scopes(oauth.effective_scopes()))
    if "user_code" not in flow:
        raise CollectorError(
            f"device login could not start: {flow.get('error')} "
            f"{str(flow.get('error_description', ''))[:ERROR_EXCERPT_CHARS]}"
        )
    echo(str(flow["message"]))
    _msal_result(app.acquire_token_by_device_flow(flow), "device login")
    token_file.save({"format": "msal", "msal_cache": cache.serialize()})

