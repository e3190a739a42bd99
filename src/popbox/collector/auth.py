"""How the collector's POP3 client gets credentials: passwords and OAuth2 access tokens.

The client's XOAUTH2/OAUTHBEARER code asks a ``TokenProvider`` for a bearer token; the
token sources (a command, a stored refresh token, client credentials) live in
``popbox.collector.oauth`` and are loaded only for accounts with ``auth = "oauth2"``,
so a password-only installation never imports msal.

Contract for ``popbox.collector.oauth``: it defines
``create_token_provider(account: AccountSettings, settings: FetchSettings) -> TokenProvider``
and raises ConfigError for settings it cannot use. It also defines the click command
``login_command`` (``popbox fetch``'s sibling ``popbox oauth login ACCOUNT``), which
``popbox.collector.cli.oauth_group`` imports lazily; it receives the config path via
a ``--config`` option of its own (``click.Path``) and calls
``popbox.collector.config.load_fetch_settings``.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from popbox.collector.config import AccountSettings, FetchSettings
from popbox.errors import ConfigError

__all__ = ["StaticTokenProvider", "TokenProvider", "build_token_provider", "read_password"]


@runtime_checkable
class TokenProvider(Protocol):
    """Hands out OAuth2 access tokens for one account."""

    async def token(self, *, force_refresh: bool = False) -> str:
        """A currently valid access token.

        ``force_refresh`` is set after the server rejected the last token (it expired
        mid-run): the provider must not return a cached token then. Raises
        CollectorError when no token can be had (ConfigError when never configured).
        """
        ...


class StaticTokenProvider:
    """A fixed token, or a list handed out in turn on refresh (tests, one-shot use)."""

    def __init__(self, *tokens: str) -> None:
        if not tokens:
            raise ValueError("at least one token")
        self._tokens = list(tokens)
        self._index = 0
        self.refreshes = 0

    async def token(self, *, force_refresh: bool = False) -> str:
        if force_refresh:
            self.refreshes += 1
            self._index = min(self._index + 1, len(self._tokens) - 1)
        return self._tokens[self._index]


def build_token_provider(account: AccountSettings, settings: FetchSettings) -> TokenProvider:
    """The token provider for an ``auth = "oauth2"`` account (imports oauth lazily)."""
    if account.auth != "oauth2" or account.oauth is None:
        raise ConfigError(f"fetch.accounts.{account.name}: not an oauth2 account")
    module = importlib.import_module("popbox.collector.oauth")
    provider: TokenProvider = module.create_token_provider(account, settings)
    return provider


def read_password(account: AccountSettings) -> str:
    """The account's password from its env/file/command source."""
    source = account.password_source()
    if source is None:
        raise ConfigError(f"fetch.accounts.{account.name}: no password configured")
    return source.read()
