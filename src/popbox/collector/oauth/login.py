"""``popbox oauth login ACCOUNT [--sink LABEL]``: sign a login in once and store its refresh token.

A login is an account's POP3 source or one of its sinks (IMAP, the Gmail API) with
its own ``[oauth]`` table. Two flows: the browser (authorization code with PKCE,
``oauth.browser``; the only one Google allows for mail scopes) and the device code
(RFC 8628, ``oauth.flows``). Microsoft's go through msal (``oauth.microsoft``,
imported only for it).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click

from popbox.collector.config import (
    AccountSettings,
    FetchSettings,
    OAuthSettings,
    load_fetch_settings,
)
from popbox.collector.config_common import OAuthPurpose
from popbox.collector.oauth.browser import (
    GOOGLE_OFFLINE_PARAMETERS,
    BrowserOptions,
    generic_browser_login,
)
from popbox.collector.oauth.flows import (
    authorization_endpoint_for,
    generic_device_login,
    http_client_for,
)
from popbox.collector.oauth.loopback import stdin_lines
from popbox.collector.oauth.tokenfile import TokenFile
from popbox.errors import ConfigError, PopboxError

__all__ = ["LoginTarget", "login_command", "login_target", "stored_logins"]

Flow = Literal["browser", "device"]


@dataclass(frozen=True, slots=True)
class LoginTarget:
    """One login to sign in: the account's POP3 source, or one of its sinks."""

    account: str
    sink: str | None
    """The sink's label; None for the POP3 login."""
    oauth: OAuthSettings
    purpose: OAuthPurpose
    store: Path

    @property
    def what(self) -> str:
        where = f"fetch.accounts.{self.account}"
        return where if self.sink is None else f"{where}: sink {self.sink}"

    def default_flow(self) -> Flow:
        """Google allows no device flow for mail scopes; the others keep the device flow."""
        return "browser" if self.oauth.provider == "google" else "device"


def _oauth_sinks(entry: AccountSettings) -> list[tuple[str, OAuthSettings, OAuthPurpose]]:
    found: list[tuple[str, OAuthSettings, OAuthPurpose]] = []
    for sink in entry.sinks:
        oauth = getattr(sink, "oauth", None)
        if getattr(sink, "auth", None) == "oauth2" and isinstance(oauth, OAuthSettings):
            found.append((sink.label, oauth, "gmail" if sink.kind == "gmail" else "imap"))
    return found


def login_target(settings: FetchSettings, account: str, sink: str | None) -> LoginTarget:
    """The login ``popbox oauth login ACCOUNT [--sink LABEL]`` means: with a sink label
    (or name), that sink's; else the POP3 login, or the only sink with OAuth2 when the
    POP3 login has none."""
    entry = settings.account(account)
    sinks = _oauth_sinks(entry)
    if sink is None and not (entry.auth == "oauth2" and entry.oauth is not None):
        if len(sinks) != 1:
            labels = ", ".join(label for label, _, _ in sinks)
            raise ConfigError(
                f"fetch.accounts.{account}: auth is not oauth2"
                + (f"; choose a sink with --sink: {labels}" if sinks else " and no sink uses it")
            )
        sink = sinks[0][0]
    if sink is None:
        assert entry.oauth is not None
        target = LoginTarget(account, None, entry.oauth, "pop3", settings.oauth_token_store(entry))
    else:
        for candidate in entry.sinks:
            if candidate.label == sink:
                break
        else:
            raise ConfigError(f"fetch.accounts.{account}: no sink labelled {sink!r}")
        match = [(oauth, purpose) for label, oauth, purpose in sinks if label == sink]
        if not match:
            raise ConfigError(f"fetch.accounts.{account}: sink {sink} does not use auth = oauth2")
        oauth, purpose = match[0]
        target = LoginTarget(
            account, sink, oauth, purpose, settings.sink_token_store(entry, candidate)
        )
    if target.oauth.token_source != "refresh_token":  # noqa: S105 a setting name
        raise ConfigError(
            f"{target.what}: token_source = {target.oauth.token_source} "
            "needs no login (only refresh_token does)"
        )
    return target


def stored_logins(settings: FetchSettings, entry: AccountSettings) -> list[LoginTarget]:
    """Every login of ``entry`` that keeps a refresh token: POP3 first, then sinks."""
    found: list[LoginTarget] = []
    if entry.auth == "oauth2" and entry.oauth is not None:
        found.append(
            LoginTarget(entry.name, None, entry.oauth, "pop3", settings.oauth_token_store(entry))
        )
    for sink in entry.sinks:
        oauth = getattr(sink, "oauth", None)
        if getattr(sink, "auth", None) == "oauth2" and isinstance(oauth, OAuthSettings):
            purpose: OAuthPurpose = "gmail" if sink.kind == "gmail" else "imap"
            store = settings.sink_token_store(entry, sink)
            found.append(LoginTarget(entry.name, sink.label, oauth, purpose, store))
    return [
        target for target in found
        if target.oauth.token_source == "refresh_token"  # noqa: S105 a setting name
    ]


def run_login(target: LoginTarget, flow: Flow, options: BrowserOptions) -> TokenFile:
    """Sign ``target`` in with ``flow``; returns the token file it was stored in."""
    token_file = TokenFile(target.store)
    oauth = target.oauth
    scopes = oauth.effective_scopes(target.purpose)
    if oauth.provider == "microsoft":
        from popbox.collector.oauth.microsoft import msal_browser_login, msal_device_login

        if flow == "device":
            msal_device_login(oauth, token_file, options.echo, scopes=scopes)
        else:
            asyncio.run(msal_browser_login(oauth, token_file, options, scopes=scopes))
        return token_file
    client = http_client_for(oauth, target.purpose)
    if flow == "device":
        asyncio.run(generic_device_login(client, token_file, options.echo))
        return token_file
    extra = GOOGLE_OFFLINE_PARAMETERS if oauth.provider == "google" else {}
    endpoint = authorization_endpoint_for(oauth)
    asyncio.run(
        generic_browser_login(client, endpoint, token_file, options, extra_parameters=extra)
    )
    return token_file


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
@click.option(
    "--sink",
    "sink",
    metavar="LABEL",
    help="Sign in this sink's own [oauth] login (IMAP, Gmail API) instead of the POP3 one.",
)
@click.option(
    "--flow",
    type=click.Choice(["browser", "device"]),
    help="browser (code with PKCE; Google's default) or device (the others' default).",
)
@click.option(
    "--no-browser",
    is_flag=True,
    help="Only print the address; open no browser here (a server, or another machine).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default="any free port",
    help="The loopback port the browser returns to (fixed, e.g. for ssh -L PORT:127.0.0.1:PORT).",
)
def login_command(
    account: str,
    config_path: Path,
    sink: str | None,
    flow: Flow | None,
    no_browser: bool,
    port: int,
) -> None:
    """Sign ACCOUNT's POP3 login (or --sink LABEL's) in once and store its refresh token."""
    try:
        settings = load_fetch_settings(config_path)
        target = login_target(settings, account, sink)
        if sink is None and target.sink is not None:
            click.echo(f"Signing in sink {target.sink}, the only OAuth2 login of {account}.")
        options = BrowserOptions(
            echo=click.echo,
            port=port,
            open_browser=not no_browser,
            pasted=stdin_lines(sys.stdin),
        )
        token_file = run_login(target, flow or target.default_flow(), options)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Signed in; the refresh token is stored in {token_file.path} (mode 0600).")
