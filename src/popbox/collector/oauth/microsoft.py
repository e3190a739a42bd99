"""Microsoft 365 through msal: delegated and app-only token providers, the device login
and the browser login (msal's authorization code flow with PKCE on our loopback listener).

Entra ID's details (authority discovery, token cache format, refresh token rotation)
are msal's to keep right, so Microsoft goes through msal rather than plain RFC 6749
requests. Importing this module imports msal; only Microsoft accounts do.
"""

from __future__ import annotations

import asyncio
import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msal
import requests  # msal's own HTTP library, so a dependency already

from popbox.collector.config import OAuthSettings
from popbox.collector.oauth.bearer import (
    ERROR_EXCERPT_CHARS,
    SIGN_IN_COMMAND,
    check_bearer_token,
    login_required,
)
from popbox.collector.oauth.browser import BrowserOptions, authorize_in_browser
from popbox.collector.oauth.flows import HTTP_TIMEOUT
from popbox.collector.oauth.tokenfile import TokenFile
from popbox.errors import CollectorError

__all__ = [
    "MICROSOFT_AUTHORITY_HOST",
    "MsalClientCredentialsProvider",
    "MsalRefreshTokenProvider",
    "authority_of",
    "msal_browser_login",
    "msal_device_login",
]

MICROSOFT_AUTHORITY_HOST: Final = "https://login.microsoftonline.com"
# msal adds these itself and refuses them in a scope list.
MSAL_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access"})
# What Entra ID answers when only a new sign-in helps: RFC 6749's invalid_grant and
# OpenID's interaction_required (MFA, consent, password change, revoked sessions).
MSAL_LOGIN_ERRORS: Final = frozenset({"invalid_grant", "interaction_required", "login_required"})
# AADSTS codes of a dead refresh token, when a proxy or msal reports another error:
# 700082 expired by inactivity (90 days), 50173 grant revoked (password reset),
# 70008 expired or revoked, 70043 expired by a sign-in frequency policy,
# 50078/50079/50076 multi-factor sign-in required, 65001 consent withdrawn.
MSAL_LOGIN_CODES: Final = (
    "AADSTS700082", "AADSTS50173", "AADSTS70008", "AADSTS70043",
    "AADSTS50076", "AADSTS50078", "AADSTS50079", "AADSTS65001",
)


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


def _login_is_dead(result: dict[str, Any]) -> bool:
    description = str(result.get("error_description", ""))
    return str(result.get("error")) in MSAL_LOGIN_ERRORS or any(
        code in description for code in MSAL_LOGIN_CODES
    )


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
        what: str = "oauth",
        sign_in: str = SIGN_IN_COMMAND,
    ) -> None:
        self._file = token_file
        self._what = what
        self._sign_in = sign_in
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
            raise login_required(
                self._what, f"never signed in (no login in {self._file.path})", self._sign_in
            )
        try:
            result = self._app.acquire_token_silent_with_error(
                self._scopes, account=accounts[0], force_refresh=force_refresh
            )
        except requests.RequestException as exc:
            raise CollectorError(f"Microsoft token refresh: {type(exc).__name__}: {exc}") from exc
        if self._cache.has_state_changed:
            # msal rotated the refresh token; losing it would force a new login.
            self._file.save({"format": "msal", "msal_cache": self._cache.serialize()})
            self._cache.has_state_changed = False
        if result is None:  # msal found no refresh token for these scopes
            raise login_required(
                self._what, f"the login in {self._file.path} holds no usable token", self._sign_in
            )
        if "access_token" not in result and _login_is_dead(result):
            code = result.get("error")
            detail = str(result.get("error_description", ""))[:ERROR_EXCERPT_CHARS]
            raise login_required(
                self._what, f"the stored login no longer works ({code}: {detail})", self._sign_in
            )
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


def _public_client(
    oauth: OAuthSettings, cache: msal.SerializableTokenCache, ca_file: Path | None
) -> msal.PublicClientApplication:
    try:
        return msal.PublicClientApplication(
            oauth.client_id, token_cache=cache, **_msal_options(authority_of(oauth), ca_file)
        )
    except requests.RequestException as exc:  # the authority's discovery document
        raise CollectorError(f"Microsoft sign-in: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # msal's word for an authority it cannot use
        raise CollectorError(f"Microsoft sign-in: {exc}") from exc


def msal_device_login(
    oauth: OAuthSettings,
    token_file: TokenFile,
    echo: Callable[[str], None],
    *,
    scopes: Sequence[str] | None = None,
    ca_file: Path | None = None,
) -> None:
    """Microsoft device-code login with msal; stores msal's cache in ``token_file``.
    ``scopes`` default to the POP3 login's."""
    cache = msal.SerializableTokenCache()
    app = _public_client(oauth, cache, ca_file)
    wanted = oauth.effective_scopes() if scopes is None else scopes
    flow = app.initiate_device_flow(scopes=_msal_scopes(wanted))
    if "user_code" not in flow:
        raise CollectorError(
            f"device login could not start: {flow.get('error')} "
            f"{str(flow.get('error_description', ''))[:ERROR_EXCERPT_CHARS]}"
        )
    echo(str(flow["message"]))
    _msal_result(app.acquire_token_by_device_flow(flow), "device login")
    token_file.save({"format": "msal", "msal_cache": cache.serialize()})


async def msal_browser_login(
    oauth: OAuthSettings,
    token_file: TokenFile,
    options: BrowserOptions,
    *,
    scopes: Sequence[str] | None = None,
    ca_file: Path | None = None,
) -> None:
    """Microsoft browser login: msal builds the PKCE request and redeems the code,
    our listener takes the redirect at ``http://localhost:PORT`` (the redirect URI an
    Entra "Mobile and desktop" platform registers as ``http://localhost``, any port).
    Stores msal's cache in ``token_file`` as the device login does."""
    cache = msal.SerializableTokenCache()
    app = await asyncio.to_thread(_public_client, oauth, cache, ca_file)
    wanted = _msal_scopes(oauth.effective_scopes() if scopes is None else scopes)
    flow: dict[str, Any] = {}

    async def start(redirect_uri: str) -> tuple[str, str]:
        # The answer comes in the query (Entra's default), not form_post as msal
        # advises: only an address can be pasted from a browser on another machine,
        # and PKCE makes a code that leaks from the address bar useless to others.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "response_mode='form_post'", UserWarning)
            # prompt=select_account: the browser may hold another user's session.
            flow.update(app.initiate_auth_code_flow(
                wanted, redirect_uri=redirect_uri, prompt="select_account"
            ))
        return str(flow["auth_uri"]), str(flow["state"])

    answer, _ = await authorize_in_browser(start, options, redirect_host="localhost")
    try:
        result = await asyncio.to_thread(app.acquire_token_by_auth_code_flow, flow, answer)
    except requests.RequestException as exc:
        raise CollectorError(f"browser login: {type(exc).__name__}: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # msal's state and nonce checks
        raise CollectorError(f"browser login: msal refused the answer: {exc}") from exc
    _msal_result(result, "browser login")
    await asyncio.to_thread(token_file.save, {"format": "msal", "msal_cache": cache.serialize()})
