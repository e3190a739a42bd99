"""How the collector's POP3 client gets credentials: passwords and OAuth2 access tokens.

The client's XOAUTH2/OAUTHBEARER code asks a ``TokenProvider`` (``collector.tokens``)
for a bearer token; the token sources (a command, a stored refresh token, client
credentials) live in the ``popbox.collector.oauth`` package and are loaded only for
accounts with ``auth = "oauth2"``, so a password-only installation never imports
httpx or msal.

Contract for ``popbox.collector.oauth``: it defines
``create_token_provider(account: AccountSettings, settings: FetchSettings) -> TokenProvider``
and raises ConfigError for settings it cannot use. It also defines the click command
``login_command`` (``popbox fetch``'s sibling ``popbox oauth login ACCOUNT``), which
``popbox.collector.cli.oauth_group`` imports lazily; it receives the config path via
a ``--config`` option of its own (``click.Path``) and calls
``popbox.collector.config.load_fetch_settings``. For a sink that logs in with OAuth2
(IMAP, Gmail) it defines ``create_sink_token_provider(account, settings, sink)``. The
package imports ``collector.tokens``, never this module.
"""

from __future__ import annotations

from popbox.collector.config import AccountSettings, FetchSettings, SinkSettings
from popbox.collector.tokens import TokenProvider
from popbox.errors import ConfigError

__all__ = ["build_sink_token_provider", "build_token_provider", "read_password"]


def build_token_provider(account: AccountSettings, settings: FetchSettings) -> TokenProvider:
    """The token provider for an ``auth = "oauth2"`` account (imports oauth lazily)."""
    if account.auth != "oauth2" or account.oauth is None:
        raise ConfigError(f"fetch.accounts.{account.name}: not an oauth2 account")
    from popbox.collector.oauth import create_token_provider

    return create_token_provider(account, settings)


def build_sink_token_provider(
    account: AccountSettings, settings: FetchSettings, sink: SinkSettings
) -> TokenProvider:
    """The token provider of a sink's own OAuth2 login (imports oauth lazily)."""
    from popbox.collector.oauth import create_sink_token_provider

    return create_sink_token_provider(account, settings, sink)


def read_password(account: AccountSettings) -> str:
    """The account's password from its env/file/command source."""
    source = account.password_source()
    if source is None:
        raise ConfigError(f"fetch.accounts.{account.name}: no password configured")
    return source.read()
