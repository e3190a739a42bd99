"""``popbox oauth login ACCOUNT``: sign an account in once and store its refresh token.

Microsoft accounts sign in through msal's device flow (``oauth.microsoft``, imported
only for them); every other provider through the RFC 8628 flow of ``oauth.flows``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from popbox.collector.config import load_fetch_settings
from popbox.collector.oauth.flows import generic_device_login, http_client_for
from popbox.collector.oauth.tokenfile import TokenFile
from popbox.errors import ConfigError, PopboxError

__all__ = ["login_command"]


@click.command("login")
@click.argument("account")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="POPBOX_CONFIG",
    required=True,
    help="The TOML file with the [fetch] table that defines ACCOUNT.",
)
def login_command(account: str, config_path: Path) -> None:
    """Sign ACCOUNT in once with the device-code flow and store its refresh token."""
    try:
        settings = load_fetch_settings(config_path)
        entry = settings.account(account)
        oauth = entry.oauth
        if entry.auth != "oauth2" or oauth is None:
            raise ConfigError(f"fetch.accounts.{account}: auth is not oauth2")
        if oauth.token_source != "refresh_token":  # noqa: S105 a setting name
            raise ConfigError(
                f"fetch.accounts.{account}: token_source = {oauth.token_source} "
                "needs no login (only refresh_token does)"
            )
        token_file = TokenFile(settings.oauth_token_store(entry))
        if oauth.provider == "microsoft":
            from popbox.collector.oauth.microsoft import msal_device_login

            msal_device_login(oauth, token_file, click.echo)
        else:
            asyncio.run(generic_device_login(http_client_for(oauth), token_file, click.echo))
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Signed in; the refresh token is stored in {token_file.path} (mode 0600).")
