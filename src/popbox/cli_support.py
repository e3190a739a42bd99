"""What the `popbox` subcommands share: the --config option, loading the server's
settings, the user database's edits and users (the passwd file or PostgreSQL, as
``auth.backend`` says), and running one piece of work on the mail store."""

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
    from popbox.auth.useradmin import UserAdmin
    from popbox.config import Config
    from popbox.store.base import MailStore

T = TypeVar("T")

__all__ = [
    "CONFIG_ENV",
    "config_option",
    "find_user",
    "load",
    "open_user_admin",
    "passwd_users",
    "read_password",
    "require_user",
    "run_admin",
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


def open_user_admin(config: Config) -> UserAdmin:
    """The edits of the user database ``auth.backend`` names; close it when done."""
    if config.auth.backend == "postgresql":
        from popbox.auth.postgresql_admin import PostgresUserAdmin
        from popbox.backends import pool_settings

        return PostgresUserAdmin(pool_settings(config, "users"))
    from popbox.auth.useradmin import PasswdFileUserAdmin

    return PasswdFileUserAdmin(config.auth.passwd_file, config.auth.credentials_path())


def run_admin(config: Config, work: Callable[[UserAdmin], Awaitable[T]]) -> T:
    """Run ``work`` on the user database's edits and close them; an error exits 1."""
    try:
        admin = open_user_admin(config)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc

    async def run() -> T:
        try:
            return await work(admin)
        finally:
            await admin.close()

    try:
        return asyncio.run(run())
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


async def require_user(admin: UserAdmin, name: str) -> UserRecord:
    """``name``'s record; NoSuchUser (exit 1 under run_admin) if there is none."""
    from popbox.auth.admin import NoSuchUser

    record = await admin.find_user(name)
    if record is None:
        raise NoSuchUser(f"no user {name} in {admin.where}")
    return record


def passwd_users(config: Config) -> list[UserRecord]:
    """Every user of the user database (the passwd file or PostgreSQL)."""
    return run_admin(config, lambda admin: admin.list_users())


def find_user(config: Config, name: str) -> UserRecord:
    """The user database's record of ``name``; a ClickException (exit 1) if none."""
    return run_admin(config, lambda admin: require_user(admin, name))


def run_on_store(config: Config, work: Callable[[MailStore], Awaitable[T]]) -> T:
    """Run ``work`` on the configured store and close it; a store error exits 1.

    The user database is read first, so that each user's mail is where their own
    fields say (the store reads them from its memory: auth.base.CachedUsers).
    """
    from popbox.auth.base import UserDirectory
    from popbox.backends import build_passdb, build_store, close_passdb

    try:
        passdb = build_passdb(config)
        store = build_store(config, passdb)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc

    async def run() -> T:
        try:
            if isinstance(passdb, UserDirectory):
                await asyncio.to_thread(passdb.users)
            return await work(store)
        finally:
            await store.close()
            await close_passdb(passdb)

    try:
        return asyncio.run(run())
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
