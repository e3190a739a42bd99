"""What the `popbox` subcommands share: the --config option, loading the server's
settings, the passwd file's users, and running one piece of work on the mail store."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from popbox.errors import PopboxError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from popbox.auth.base import UserRecord
    from popbox.config import Config
    from popbox.store.base import MailStore

T = TypeVar("T")

__all__ = [
    "CONFIG_ENV",
    "config_option",
    "find_user",
    "load",
    "passwd_users",
    "read_password",
    "run_on_store",
]

CONFIG_ENV = "POPBOX_CONFIG"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    help="TOML configuration file (default: the embedded default under ./popbox-data).",
)


def load(config_path: Path | None) -> Config:
    """The server's settings; a bad file exits 1 with the reason."""
    from popbox.config import load_config

    try:
        return load_config(config_path)
    except PopboxError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc


def read_password(password_stdin: bool) -> str:
    """The first line of stdin, or a prompt typed twice; never empty."""
    if password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("the password must not be empty")
    return password


def passwd_users(config: Config) -> list[UserRecord]:
    from popbox.auth.admin import list_users

    try:
        return list_users(config.auth.passwd_file)
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def find_user(config: Config, name: str) -> UserRecord:
    """The passwd file's record of ``name``; a ClickException (exit 1) if none."""
    for record in passwd_users(config):
        if record.name == name:
            return record
    raise click.ClickException(f"no user {name} in {config.auth.passwd_file}")


def run_on_store(config: Config, work: Callable[[MailStore], Awaitable[T]]) -> T:
    """Run ``work`` on the configured store and close it; a store error exits 1."""
    from popbox.backends import build_store

    try:
        store = build_store(config)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc

    async def run() -> T:
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
