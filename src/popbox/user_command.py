"""`popbox user`: the users of the user database (the passwd file or PostgreSQL, as
``auth.backend`` says), their app passwords and APOP secrets, what their mailboxes
hold, and the import of a passwd file into PostgreSQL (docs/users.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from popbox.cli_support import (
    config_option,
    find_user,
    load,
    passwd_users,
    read_password,
    require_user,
    run_admin,
    run_on_store,
)
from popbox.errors import PopboxError

if TYPE_CHECKING:
    from popbox.auth.base import UserRecord
    from popbox.auth.useradmin import UserAdmin
    from popbox.config import Config
    from popbox.store.base import MailStore, Usage
    from popbox.store.mailbox import DeviceReport

__all__ = ["user_group"]


@click.group("user")
def user_group() -> None:
    """Manage the users of the user database (auth.backend)."""


_password_stdin = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
_scheme = click.option(
    "--scheme",
    metavar="SCHEME",
    help="Password scheme instead of auth.default_scheme, e.g. SCRAM-SHA-256 (keys for "
    "SCRAM logins, as doveadm pw writes them) or ARGON2ID.",
)


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    from popbox.auth.passwdfile import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@user_group.command("add")
@config_option
@click.argument("name")
@_password_stdin
@_scheme
@click.option("--quota-messages", type=click.IntRange(min=0), help="Most messages kept.")
@click.option("--quota-size", help="Most octets kept, e.g. 500M or 2G.")
def user_add(
    config_path: Path | None,
    name: str,
    password_stdin: bool,
    scheme: str | None,
    quota_messages: int | None,
    quota_size: str | None,
) -> None:
    """Add a user (the password is hashed with the configured scheme or --scheme)."""
    from popbox.app import prepare_data_dir

    config = load(config_path)
    octets = _parse_size(quota_size)
    password = read_password(password_stdin)
    if config_path is None and config.auth.backend == "passwd-file":
        try:
            prepare_data_dir(config)
        except (PopboxError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
    run_admin(
        config,
        lambda admin: admin.add_user(
            name,
            password,
            scheme=scheme or config.auth.default_scheme,
            quota_messages=quota_messages,
            quota_octets=octets,
        ),
    )
    click.echo(f"added {name}")


@user_group.command("passwd")
@config_option
@click.argument("name")
@_password_stdin
@_scheme
def user_passwd(
    config_path: Path | None, name: str, password_stdin: bool, scheme: str | None
) -> None:
    """Set a user's password (hashed with the configured scheme or --scheme)."""
    config = load(config_path)
    password = read_password(password_stdin)
    run_admin(
        config,
        lambda admin: admin.set_password(
            name, password, scheme=scheme or config.auth.default_scheme
        ),
    )
    click.echo(f"password of {name} changed")


@user_group.command("del")
@config_option
@click.argument("name")
def user_del(config_path: Path | None, name: str) -> None:
    """Remove a user, with their app passwords and APOP secret (their mail stays)."""
    config = load(config_path)
    maildir = _maildir_of(config, name)
    run_admin(config, lambda admin: admin.delete_user(name))
    click.echo(f"removed {name}; their mail stays in {maildir}")


def _maildir_of(config: Config, name: str) -> str:
    """Where ``name``'s Maildir is, for a message ("?" with the reason if unknown)."""
    from popbox.store.maildir import MaildirStore

    async def where(store: MailStore) -> str:
        return str(store.maildir(name)) if isinstance(store, MaildirStore) else "?"

    try:
        return run_on_store(config, where)
    except click.ClickException as exc:
        return f"? ({exc.message})"


@user_group.group("app-password")
def app_password() -> None:
    """Manage a user's app passwords: labelled passwords for one device or program
    each, revocable one by one (docs/security.md)."""


@app_password.command("add")
@config_option
@click.argument("name")
@click.argument("label")
def app_password_add(config_path: Path | None, name: str, label: str) -> None:
    """Give user NAME a new app password labelled LABEL and print it (once: only its
    hash is kept)."""
    config = load(config_path)

    async def add(admin: UserAdmin) -> str:
        await require_user(admin, name)
        return await admin.add_app_password(name, label, scheme=config.auth.default_scheme)

    password = run_admin(config, add)
    click.echo(f"app password {label} of {name} (shown once, spaces and dashes optional):")
    click.echo(password)


@app_password.command("list")
@config_option
@click.argument("name")
def app_password_list(config_path: Path | None, name: str) -> None:
    """List user NAME's app passwords (labels and when they were made)."""
    from popbox.auth.credentials import AppPassword

    config = load(config_path)

    async def listing(admin: UserAdmin) -> list[AppPassword]:
        await require_user(admin, name)
        return await admin.list_app_passwords(name)

    apps = run_admin(config, listing)
    if not apps:
        click.echo(f"{name} has no app passwords")
    for app in apps:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(app.created))
        click.echo(f"{app.label}\tcreated {made}")


@app_password.command("revoke")
@config_option
@click.argument("name")
@click.argument("label")
def app_password_revoke(config_path: Path | None, name: str, label: str) -> None:
    """Revoke user NAME's app password LABEL: its next login fails (no restart)."""
    config = load(config_path)
    run_admin(config, lambda admin: admin.revoke_app_password(name, label))
    click.echo(f"revoked app password {label} of {name}")


@user_group.command("apop-secret")
@config_option
@click.argument("name")
@click.option(
    "--secret-stdin", is_flag=True, help="Read the secret from stdin instead of generating one."
)
def user_apop_secret(config_path: Path | None, name: str, secret_stdin: bool) -> None:
    """Set user NAME's APOP secret (generated and printed unless given): APOP logins
    check it, never the login password. Needs pop3.apop = true."""
    config = load(config_path)
    given = read_password(True) if secret_stdin else None

    async def apop(admin: UserAdmin) -> str:
        await require_user(admin, name)
        return await admin.set_apop_secret(name, given)

    secret = run_admin(config, apop)
    if not secret_stdin:
        click.echo(f"APOP secret of {name} (shown once):")
        click.echo(secret)
    else:
        click.echo(f"APOP secret of {name} set")
    if not config.pop3.apop:
        click.echo("note: APOP is off (pop3.apop = false); clients cannot use it yet", err=True)


@user_group.command("quota")
@config_option
@click.argument("name")
@click.option(
    "--messages", "quota_messages", type=click.IntRange(min=0), help="Most messages kept."
)
@click.option("--size", "quota_size", help="Most octets kept, e.g. 500M or 2G.")
def user_quota(
    config_path: Path | None, name: str, quota_messages: int | None, quota_size: str | None
) -> None:
    """Set user NAME's quota; a limit left out goes back to the [quota] default,
    0 is no limit."""
    config = load(config_path)
    octets = _parse_size(quota_size)
    run_admin(config, lambda admin: admin.set_quota(name, quota_messages, octets))
    click.echo(f"quota of {name} set")


@user_group.command("import-passwd")
@config_option
@click.argument("passwd", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--app-passwords",
    "side_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The side file of app passwords and APOP secrets "
    "(default: PASSWD.app-passwords, when it exists).",
)
def user_import_passwd(config_path: Path | None, passwd: Path, side_file: Path | None) -> None:
    """Copy the users of the Dovecot passwd file PASSWD (and its app passwords and
    APOP secrets) into PostgreSQL, hashes as they are. Run it again to take changed
    lines over; users the file does not have are kept."""
    from popbox.auth.postgresql_admin import ImportReport, PostgresUserAdmin
    from popbox.config import APP_PASSWORDS_SUFFIX

    config = load(config_path)
    if config.auth.backend != "postgresql":
        raise click.ClickException(
            'the users are imported into PostgreSQL: set auth.backend = "postgresql" '
            "and a [postgresql] table"
        )
    side = side_file or passwd.with_name(passwd.name + APP_PASSWORDS_SUFFIX)

    async def copy(admin: UserAdmin) -> ImportReport:
        assert isinstance(admin, PostgresUserAdmin)  # auth.backend says so
        return await admin.import_passwd(passwd, side)

    report = run_admin(config, copy)
    click.echo(f"imported {passwd}: {report.summary()}")


def _human(octets: int) -> str:
    size = float(octets)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{octets} B"


def _quota(config: Config, record: UserRecord) -> tuple[int, int]:
    """The user's (messages, octets) quota; 0 is no limit."""
    # A per-user 0 means "no limit" and overrides the default (as in Dovecot).
    messages = config.quota.messages if record.quota_messages is None else record.quota_messages
    octets = config.quota.octets if record.quota_octets is None else record.quota_octets
    return messages, octets


@user_group.command("list")
@config_option
def user_list(config_path: Path | None) -> None:
    """List users with their mail and quota usage."""
    from rich.console import Console
    from rich.table import Table

    config = load(config_path)
    records = passwd_users(config)

    async def usages(store: MailStore) -> list[Usage]:
        return [await store.usage(record.name) for record in records]

    used = run_on_store(config, usages)
    table = Table("user", "messages", "size", "quota messages", "quota size")
    for record, usage in zip(records, used, strict=True):
        quota_messages, quota_octets = _quota(config, record)
        table.add_row(
            record.name,
            str(usage.messages),
            _human(usage.octets),
            f"{usage.messages}/{quota_messages}" if quota_messages else "-",
            f"{_human(usage.octets)}/{_human(quota_octets)}" if quota_octets else "-",
        )
    Console().print(table)


def _when(stamp: float, now: float) -> str:
    """A human date for a login time: ``2026-12-07 16:53 (3 days ago)``, or ``never``."""
    from datetime import date

    if stamp <= 0:
        return "never"
    days = (date.fromtimestamp(now) - date.fromtimestamp(stamp)).days
    ago = {0: "today", 1: "yesterday"}.get(days, f"{days} days ago")
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(stamp))} ({ago})"


@user_group.command("show")
@config_option
@click.argument("name")
def user_show(config_path: Path | None, name: str) -> None:
    """Show a user's mail, folders, devices and mailbox policy."""
    from rich.console import Console
    from rich.table import Table

    from popbox.mailboxes import device_holds, policy_values

    config = load(config_path)
    record = find_user(config, name)
    policy, values = policy_values(config.mailbox, record.extra, user=name)

    async def facts(store: MailStore) -> tuple[Usage, list[str], list[DeviceReport]]:
        return await store.usage(name), await store.folders(name), await store.devices(name)

    usage, folders, devices = run_on_store(config, facts)
    now = time.time()
    # Names and passwd fields are shown as they are, never read as rich markup.
    console = Console(markup=False, highlight=False)
    quota_messages, quota_octets = _quota(config, record)
    quota = ", ".join(
        [f"{usage.messages}/{quota_messages} messages"] * bool(quota_messages)
        + [f"{_human(usage.octets)}/{_human(quota_octets)}"] * bool(quota_octets)
    )
    console.print(f"user {name}")
    # A path is printed whole, to be copied: never wrapped at the terminal's width.
    console.print(f"  maildir: {_maildir_of(config, name)}", soft_wrap=True)
    console.print(
        f"  mail: {usage.messages} message{'s' * (usage.messages != 1)}, "
        f"{_human(usage.octets)}; quota: {quota or 'none'}"
    )
    members = sorted(config.mailbox.shared_with(record.extra))
    if members:
        console.print(f"  shared with: {', '.join(members)} (each a device named after them)")
    removal = [f"{folder} (removal: {policy.disposition_in(folder).value})" for folder in folders]
    console.print(f"  folders: {', '.join(removal)}")
    settings = Table("policy", "value", "from", title=None)
    for value in values:
        settings.add_row(value.name, value.value, value.source)
    console.print(settings)
    table = Table("folder", "device", "last login", "holds mail", "pending", "deleted")
    for folder in folders:
        rows = [device for device in devices if device.folder == folder]
        if not rows:
            table.add_row(folder, "(none yet)", "", "", "", "")
        for device in rows:
            table.add_row(
                folder,
                device.device,
                _when(device.last_login, now),
                "yes" if device_holds(device, policy, now) else "no",
                str(device.pending),
                str(device.deleted),
            )
    console.print(table)
