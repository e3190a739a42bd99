"""OAuth2 access tokens for XOAUTH2/OAUTHBEARER: token providers and `popbox oauth login`.

Every provider implements ``popbox.collector.tokens.TokenProvider``: it caches the
access token until shortly before it expires and fetches a new one when asked with
``force_refresh`` (the server rejected the old one mid-run). Sources:

- ``CommandTokenProvider``: a command prints the token (oama, a vault, a script).
- ``MsalRefreshTokenProvider`` (Microsoft): msal's token cache, written by
  ``popbox oauth login`` (device code or browser) to a 0600 file in the state directory.
- ``RefreshTokenProvider`` (Google, any RFC 6749 server): a stored refresh token,
  exchanged at the token endpoint with httpx; rotated refresh tokens are saved.
- ``MsalClientCredentialsProvider`` (Microsoft 365 app-only, POP.AccessAsApp) and
  ``ClientCredentialsProvider`` (any RFC 6749 server): no user, no stored token.

A stored login that is missing or dead (``invalid_grant``, Entra's
``interaction_required``) raises ``OAuthLoginRequired`` naming the command that mends
it: ``popbox oauth login ACCOUNT [--sink LABEL]``.

One job per module: ``bearer`` (token check and cache, the login-required error),
``tokenfile`` (the 0600 store), ``flows`` (RFC 6749/8628 over httpx), ``browser``
(authorization code with PKCE), ``loopback`` (where the browser's answer arrives),
``providers`` (the sources above that need no msal, and ``create_token_provider``),
``microsoft`` (msal), ``login`` and ``status`` (the click commands). msal is imported
only when a Microsoft name is first used, so an account with a token command or a
Google login never loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from popbox.collector.oauth.bearer import sign_in_command
from popbox.collector.oauth.browser import BrowserOptions, generic_browser_login
from popbox.collector.oauth.flows import DeviceCode, OAuthHttpClient, generic_device_login
from popbox.collector.oauth.login import login_command
from popbox.collector.oauth.providers import (
    ClientCredentialsProvider,
    CommandTokenProvider,
    RefreshTokenProvider,
    create_sink_token_provider,
    create_token_provider,
)
from popbox.collector.oauth.status import status_command
from popbox.collector.oauth.tokenfile import TokenFile

if TYPE_CHECKING:
    from popbox.collector.oauth.microsoft import (
        MsalClientCredentialsProvider,
        MsalRefreshTokenProvider,
        msal_browser_login,
        msal_device_login,
    )

__all__ = [
    "BrowserOptions",
    "ClientCredentialsProvider",
    "CommandTokenProvider",
    "DeviceCode",
    "MsalClientCredentialsProvider",
    "MsalRefreshTokenProvider",
    "OAuthHttpClient",
    "RefreshTokenProvider",
    "TokenFile",
    "create_sink_token_provider",
    "create_token_provider",
    "generic_browser_login",
    "generic_device_login",
    "login_command",
    "msal_browser_login",
    "msal_device_login",
    "sign_in_command",
    "status_command",
]

_FROM_MICROSOFT = frozenset(
    {
        "MsalClientCredentialsProvider",
        "MsalRefreshTokenProvider",
        "msal_browser_login",
        "msal_device_login",
    }
)


def __getattr__(name: str) -> object:
    """The msal names, imported on first use (PEP 562) so msal stays unloaded until then."""
    if name in _FROM_MICROSOFT:
        return getattr(importlib.import_module("popbox.collector.oauth.microsoft"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
