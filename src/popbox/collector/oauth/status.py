"""``popbox oauth status [ACCOUNT]``: which stored logins exist, and since when.

One line per login that keeps a refresh token (an account's POP3 source, a sink with
its own ``[oauth]``): where its token file is and when it was last written (a login
or a rotated refresh token). It reads no token and asks no server, so a login shown
here may still have been revoked; ``popbox fetch`` says so with the command to run.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import click

from popbox.collector.config import load_fetch_settings
from popbox.collector.oauth.login import stored_logins
from popbox.errors import PopboxError

__all__ = ["status_command"]


def _written(path: Path) -> str:
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return "never signed in"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    when = datetime.datetime.fromtimestamp(mtime, datetime.UTC)
    return "saved " + when.strftime("%Y-%m-%d %H:%M UTC")


@click.command("status")
@click.argument("account", required=False)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="POPBOX_CONFIG",
    required=True,
    help="The TOML file with the [fetch] table.",
)
def status_command(account: str | None, config_path: Path) -> None:
    """List the stored OAuth2 logins (of ACCOUNT, or of every account)."""
    try:
        settings = load_fetch_settings(config_path)
        entries = [settings.account(account)] if account else list(settings.accounts)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = [
        (
            target.account,
            "pop3" if target.sink is None else f"sink {target.sink}",
            target.oauth.provider,
            _written(target.store),
            str(target.store),
        )
        for entry in entries
        for target in stored_logins(settings, entry)
    ]
    if not rows:
        click.echo("No login keeps a refresh token (token_source = refresh_token).")
        return
    header = ("ACCOUNT", "LOGIN", "PROVIDER", "STATE", "TOKEN FILE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))
