"""The `popbox` command: serve, user, device, expire, deliver, check-config, fetch, oauth."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import click

from popbox.errors import PopboxError
from popbox.import_command import import_group

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    # The server's settings load only for the commands that use them: `popbox fetch`
    # (run by cron every minute) reads its own [fetch] table and never needs them.
    from popbox.auth.base import UserRecord
    from popbox.config import Config
    from popbox.store.base import MailStore, Usage
    from popbox.store.mailbox import DeviceReport

T = TypeVar("T")

__all__ = ["main"]

CONFIG_ENV = "POPBOX_CONFIG"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    help="TOML configuration file (default: the embedded default under ./popbox-data).",
)


def _load(config_path: Path | None) -> Config:
    from popbox.config import load_config

    try:
        return load_config(config_path)
    except PopboxError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc


class _Formatter(logging.Formatter):
    """logging's default line, with the timestamp's text made once per second.

    Every POP3 session writes one line; the stock ``formatTime`` runs localtime and
    strftime for each, which showed in a busy worker's profile under login load.
    """

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def _setup_logging(config: Config, verbose: bool = False) -> None:
    # The line shows none of the caller's file, thread or process, so logging need not
    # find them for every record (the logging HOWTO's "Optimization"): walking the
    # stack for the caller and a getpid() syscall were most of a logout line's cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, config.log.level),
        handlers=[handler],
    )


class _PopboxGroup(click.Group):
    """Loads the collector's commands only when they are asked for.

    `popbox deliver` runs once per message under an MTA; importing the collector
    (httpx, rich, the poll engine) would add about a third to its start-up.
    """

    _LAZY: Final = ("fetch", "oauth")

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._LAZY:
            from popbox.backends import open_local_delivery
            from popbox.collector.cli import fetch_command, oauth_group, provide_local_delivery

            # The collector never builds a store itself: a popbox sink gets the
            # Deliverer of the server config it names from here.
            provide_local_delivery(ctx, open_local_delivery)
            return fetch_command if cmd_name == "fetch" else oauth_group
        return super().get_command(ctx, cmd_name)


@click.group(cls=_PopboxGroup)
@click.version_option(package_name="popbox")
def main() -> None:
    """popbox: a POP3 mailbox server, LMTP delivery and a POP3 collector."""


@main.command()
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def serve(config_path: Path | None, verbose: bool) -> None:
    """Run the POP3 server (and the LMTP listener) until SIGTERM or Ctrl-C."""
    from popbox.app import prepare_data_dir
    from popbox.app import serve as serve_forever

    config = _load(config_path)
    _setup_logging(config, verbose)
    try:
        made = prepare_data_dir(config)
    except (OSError, PopboxError) as exc:
        raise click.ClickException(f"cannot prepare {config.data_dir}: {exc}") from exc
    for line in made:
        click.echo(f"popbox: {line}", err=True)
    if config_path is None:
        _print_embedded_help(config)
    try:
        serve_forever(config)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc


def _print_embedded_help(config: Config) -> None:
    plain = config.pop3.listen[0] if config.pop3.listen else "127.0.0.1:1110"
    tls = config.pop3.tls_listen[0] if config.pop3.tls_listen else "127.0.0.1:1995"
    port = plain.rsplit(":", 1)[1]
    tls_port = tls.rsplit(":", 1)[1]
    cert = config.tls_cert_path()
    click.echo(
        f"""popbox: embedded default, data in {config.data_dir}
  add a user:        popbox user add alice
  deliver a message: popbox deliver alice < message.eml
  read it (STLS):    curl --ssl-reqd --cacert {cert} -u alice pop3://localhost:{port}/1
  read it (TLS):     curl --cacert {cert} -u alice pop3s://localhost:{tls_port}/1
  LMTP for an MTA:   {", ".join(config.lmtp.listen) if config.lmtp.enabled else "off"}
Stop with Ctrl-C.""",
        err=True,
    )


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration and say what it would do."""
    config = _load(config_path)
    problems: list[str] = []
    cert, key = config.tls_cert_path(), config.tls_key_path()
    if config.tls.cert is not None and not cert.exists():
        problems.append(f"tls.cert: {cert} does not exist")
    if config.tls.key is not None and not key.exists():
        problems.append(f"tls.key: {key} does not exist")
    if config.fetch:
        from popbox.collector.config import load_fetch_settings

        try:
            load_fetch_settings(config.fetch)
        except PopboxError as exc:
            problems.append(f"fetch: {exc}")
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(2)
    for warning in _user_field_warnings(config):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"configuration OK: {config_path or 'embedded default'}")
    click.echo(
        f"  POP3 {', '.join(config.pop3.listen) or '-'}; POP3S "
        f"{', '.join(config.pop3.tls_listen) or '-'}; plaintext auth "
        f"{config.pop3.plaintext_auth}"
    )
    mail = config.storage.mail_location or f"{config.storage.maildir_root}/USER"
    click.echo(f"  users {config.auth.passwd_file}; mail {mail}")
    lmtp = ", ".join(config.lmtp.listen) if config.lmtp.enabled else "off"
    click.echo(f"  LMTP {lmtp}")


def _user_field_warnings(config: Config) -> list[str]:
    """What the passwd file's extra fields ask that popbox will not do, user by user."""
    from popbox.auth.admin import list_users
    from popbox.auth.passwdfile import NOPASSWORD, mail_fields
    from popbox.auth.restrictions import NET_FIELDS, NOT_SERVED_FIELDS, check_networks
    from popbox.store.location import parse_location

    try:
        records = list_users(config.auth.passwd_file)
    except PopboxError as exc:
        return [str(exc)]
    warnings: list[str] = []
    for record in records:
        extra, name = record.extra, record.name
        for field in NOT_SERVED_FIELDS:
            if field in extra:
                warnings.append(
                    f"user {name}: {field} is set; popbox does not proxy or refer logins, "
                    "so this user's logins are refused"
                )
        if NOPASSWORD in extra and "allow_nets" not in extra:
            warnings.append(f"user {name}: nopassword without allow_nets; logins are refused")
        elif NOPASSWORD in extra:
            nets = extra["allow_nets"]
            warnings.append(f"user {name}: nopassword: any password logs in from {nets}")
        for field in NET_FIELDS:
            if field in extra:
                try:
                    check_networks(extra[field])
                except ValueError as exc:
                    warnings.append(f"user {name}: {field}: {exc}; logins are refused")
        mail = mail_fields(record)[1]
        if mail:
            try:
                parse_location(mail, source=f"user {name}: mail field")
            except ValueError as exc:
                warnings.append(str(exc))
    return warnings


@main.group()
def user() -> None:
    """Manage the users of the passwd file."""


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("the password must not be empty")
    return password


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


@user.command("add")
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
    from popbox.auth.admin import add_user

    config = _load(config_path)
    octets = _parse_size(quota_size)
    password = _read_password(password_stdin)
    try:
        if config_path is None:
            prepare_data_dir(config)
        add_user(
            config.auth.passwd_file,
            name,
            password,
            scheme=scheme or config.auth.default_scheme,
            quota_messages=quota_messages,
            quota_octets=octets,
        )
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"added {name}")


@user.command("passwd")
@config_option
@click.argument("name")
@_password_stdin
@_scheme
def user_passwd(
    config_path: Path | None, name: str, password_stdin: bool, scheme: str | None
) -> None:
    """Set a user's password (hashed with the configured scheme or --scheme)."""
    from popbox.auth.admin import set_password

    config = _load(config_path)
    password = _read_password(password_stdin)
    try:
        set_password(
            config.auth.passwd_file, name, password, scheme=scheme or config.auth.default_scheme
        )
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"password of {name} changed")


@user.command("del")
@config_option
@click.argument("name")
def user_del(config_path: Path | None, name: str) -> None:
    """Remove a user from the passwd file (their mail stays on disk)."""
    from popbox.auth.admin import delete_user, remove_credentials

    config = _load(config_path)
    maildir = _maildir_of(config, name)
    try:
        delete_user(config.auth.passwd_file, name)
        remove_credentials(config.auth.credentials_path(), name)
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed {name}; their mail stays in {maildir}")


def _maildir_of(config: Config, name: str) -> str:
    """Where ``name``'s Maildir is, for a message ("?" with the reason if unknown)."""
    from popbox.backends import build_store
    from popbox.store.maildir import MaildirStore

    try:
        store = build_store(config)
        if isinstance(store, MaildirStore):
            return str(store.maildir(name))
    except PopboxError as exc:
        return f"? ({exc})"
    return "?"


@user.group("app-password")
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
    from popbox.auth.admin import add_app_password

    config = _load(config_path)
    _user(config, name)
    try:
        password = add_app_password(
            config.auth.credentials_path(), name, label, scheme=config.auth.default_scheme
        )
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"app password {label} of {name} (shown once, spaces and dashes optional):")
    click.echo(password)


@app_password.command("list")
@config_option
@click.argument("name")
def app_password_list(config_path: Path | None, name: str) -> None:
    """List user NAME's app passwords (labels and when they were made)."""
    from popbox.auth.admin import list_app_passwords

    config = _load(config_path)
    _user(config, name)
    try:
        apps = list_app_passwords(config.auth.credentials_path(), name)
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
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
    from popbox.auth.admin import revoke_app_password

    config = _load(config_path)
    try:
        revoke_app_password(config.auth.credentials_path(), name, label)
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"revoked app password {label} of {name}")


@user.command("apop-secret")
@config_option
@click.argument("name")
@click.option(
    "--secret-stdin", is_flag=True, help="Read the secret from stdin instead of generating one."
)
def user_apop_secret(config_path: Path | None, name: str, secret_stdin: bool) -> None:
    """Set user NAME's APOP secret (generated and printed unless given): APOP logins
    check it, never the login password. Needs pop3.apop = true."""
    from popbox.auth.admin import set_apop_secret

    config = _load(config_path)
    _user(config, name)
    secret = _read_password(True) if secret_stdin else None
    try:
        secret = set_apop_secret(config.auth.credentials_path(), name, secret)
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not secret_stdin:
        click.echo(f"APOP secret of {name} (shown once):")
        click.echo(secret)
    else:
        click.echo(f"APOP secret of {name} set")
    if not config.pop3.apop:
        click.echo("note: APOP is off (pop3.apop = false); clients cannot use it yet", err=True)


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


def _users(config: Config) -> list[UserRecord]:
    from popbox.auth.admin import list_users

    try:
        return list_users(config.auth.passwd_file)
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def _user(config: Config, name: str) -> UserRecord:
    """The passwd file's record of ``name``; a ClickException (exit 1) if none."""
    for record in _users(config):
        if record.name == name:
            return record
    raise click.ClickException(f"no user {name} in {config.auth.passwd_file}")


def _run_on_store(config: Config, work: Callable[[MailStore], Awaitable[T]]) -> T:
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


@user.command("list")
@config_option
def user_list(config_path: Path | None) -> None:
    """List users with their mail and quota usage."""
    from rich.console import Console
    from rich.table import Table

    config = _load(config_path)
    records = _users(config)

    async def usages(store: MailStore) -> list[Usage]:
        return [await store.usage(record.name) for record in records]

    used = _run_on_store(config, usages)
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


@user.command("show")
@config_option
@click.argument("name")
def user_show(config_path: Path | None, name: str) -> None:
    """Show a user's mail, folders, devices and mailbox policy."""
    from rich.console import Console
    from rich.table import Table

    from popbox.mailboxes import device_holds, policy_values

    config = _load(config_path)
    record = _user(config, name)
    policy, values = policy_values(config.mailbox, record.extra, user=name)

    async def facts(store: MailStore) -> tuple[Usage, list[str], list[DeviceReport]]:
        return await store.usage(name), await store.folders(name), await store.devices(name)

    usage, folders, devices = _run_on_store(config, facts)
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


@main.group()
def device() -> None:
    """Manage the devices that read a user's mailbox (docs/mailbox-model.md)."""


@device.command("forget")
@config_option
@click.argument("name")
@click.argument("device_name", metavar="DEVICE")
def device_forget(config_path: Path | None, name: str, device_name: str) -> None:
    """Forget DEVICE of user NAME in every folder: it stops holding mail back, and
    at its next login it sees every message again, as a new device."""
    from popbox.errors import MaildropInUse
    from popbox.mailboxes import known_devices

    config = _load(config_path)
    _user(config, name)

    async def forget(store: MailStore) -> tuple[int, list[str]]:
        try:
            count = await store.forget_device(name, device_name)
        except MaildropInUse as exc:
            raise click.ClickException(
                f"cannot forget device {device_name} of {name} now: a POP3 session holds "
                "one of its folders (nothing changed in that one); try again when the "
                "session has ended"
            ) from exc
        return count, [] if count else known_devices(await store.devices(name))

    count, known = _run_on_store(config, forget)
    if not count:
        raise click.ClickException(
            f"{name} has no device {device_name!r}; known devices: {', '.join(known) or 'none'}"
        )
    click.echo(f"forgot device {device_name} of {name} in {count} folder{'s' * (count != 1)}")


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``--now``: ISO 8601 (local time if it gives no offset) or epoch seconds."""
    if value is None:
        return None
    from datetime import datetime

    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither ISO 8601 (2027-01-31T12:00+00:00) nor epoch seconds"
        ) from None


@main.command()
@config_option
@click.argument("users", nargs=-1, metavar="[USER]...")
@click.option(
    "--now",
    metavar="ISO-8601|EPOCH",
    callback=_moment,
    help="Act as if it were this time (ISO 8601 or epoch seconds): to try a policy, "
    "or in tests. Removals are real.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every user's sweep.")
def expire(
    config_path: Path | None, users: tuple[str, ...], now: float | None, verbose: bool
) -> None:
    """Sweep every user's mailbox (or only USERs) once, for cron.

    Removes what the mailbox policy lets go: messages every active device deleted,
    expired retention, hidden messages past keep_days, Trash past trash_days.
    `popbox serve` does the same every mailbox.sweep_interval. Exit code 1 if some
    user's sweep failed.
    """
    from popbox.mailboxes import describe_report, sweep_users

    config = _load(config_path)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    records = _users(config)
    if users:
        by_name = {record.name: record for record in records}
        unknown = [name for name in users if name not in by_name]
        if unknown:
            raise click.ClickException(f"no user {', '.join(unknown)} in {config.auth.passwd_file}")
        records = [by_name[name] for name in dict.fromkeys(users)]

    summary = _run_on_store(
        config, lambda store: sweep_users(config.mailbox, store, records, now=now)
    )
    if now is not None:
        click.echo(f"as if at {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(now))}")
    for item in summary.users:
        if item.report is not None and item.did_something:
            click.echo(f"{item.user}: {describe_report(item.report)}")
    click.echo(summary.describe())
    if summary.failed:
        sys.exit(1)


main.add_command(import_group)


@main.command()
@config_option
@click.argument("recipient")
@click.option("--from", "sender", help="Envelope sender (for Return-Path).")
@click.option(
    "-m",
    "--folder",
    help="Folder to deliver into (as for RECIPIENT+FOLDER; INBOX if it may not be used).",
)
def deliver(
    config_path: Path | None, recipient: str, sender: str | None, folder: str | None
) -> None:
    """Deliver the message on stdin to RECIPIENT (a local delivery agent).

    Exit codes follow sysexits: 0 delivered, 67 no such user, 75 temporary failure
    (the MTA retries), 73 cannot create, 65 data error.
    """
    from popbox.config import load_config
    from popbox.delivery.lda import EX_TEMPFAIL

    try:
        config = load_config(config_path)
    except PopboxError as exc:
        # A broken configuration must make the MTA retry later, never bounce mail.
        click.echo(f"popbox deliver: configuration: {exc}", err=True)
        sys.exit(EX_TEMPFAIL)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(_deliver_stdin(config, recipient, sender, folder)))


async def _deliver_stdin(
    config: Config, recipient: str, sender: str | None, folder: str | None
) -> int:
    """`popbox deliver`: build the Deliverer, hand it the message on stdin, close it."""
    from popbox.backends import open_delivery
    from popbox.delivery.lda import report_setup_failure, run_lda

    try:
        backend = open_delivery(config)
    except (PopboxError, OSError) as exc:
        return report_setup_failure(exc)
    try:
        return await run_lda(
            backend.deliverer, recipient, sender, sys.stdin.buffer, folder=folder
        )
    finally:
        await backend.close()
