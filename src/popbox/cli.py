"""The `popbox` command: serve, user, device, expire, deliver, check-config, fetch, oauth,
archive, backup, restore."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

from popbox.archive_command import archive_group
from popbox.backup_command import backup_command, restore_command
from popbox.cli_support import config_option, find_user, load, passwd_users, run_on_store
from popbox.errors import PopboxError
from popbox.import_command import import_group
from popbox.migrate_command import migrate_command
from popbox.user_command import user_group

if TYPE_CHECKING:
    # The server's settings load only for the commands that use them: `popbox fetch`
    # (run by cron every minute) reads its own [fetch] table and never needs them.
    from popbox.config import Config
    from popbox.store.base import MailStore

__all__ = ["main"]


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

    config = load(config_path)
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


@main.command()
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def web(config_path: Path | None, verbose: bool) -> None:
    """Serve the archive's web page on its own (web.listen) until SIGTERM or Ctrl-C.

    ``popbox serve`` serves it too when ``web.enabled`` is set; this is for a
    machine that serves only the page.
    """
    from popbox.app import prepare_data_dir, serve_web_alone

    config = load(config_path)
    _setup_logging(config, verbose)
    try:
        prepare_data_dir(config)
        serve_web_alone(config)
    except (OSError, PopboxError) as exc:
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
  the archive:       {f"http://{config.web.listen}/" if config.web.enabled else "off"}
Stop with Ctrl-C.""",
        err=True,
    )


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration and say what it would do."""
    config = load(config_path)
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
    users = "PostgreSQL" if config.auth.backend == "postgresql" else config.auth.passwd_file
    if config.storage.backend == "postgresql":
        mail = "PostgreSQL"
    click.echo(f"  users {users}; mail {mail}")
    lmtp = ", ".join(config.lmtp.listen) if config.lmtp.enabled else "off"
    click.echo(f"  LMTP {lmtp}")
    where = "PostgreSQL" if config.archive_backend() == "postgresql" else config.archive_path()
    kept = ", ".join(config.archive.keep) or "imports only"
    days = config.archive.retention_days
    click.echo(
        f"  archive {where}; keeps {kept}; "
        + (f"for {days} days" if days is not None else "for ever")
    )
    page = f"http://{config.web.listen}/" if config.web.enabled else "off"
    admins = ", ".join(config.web.admins) or "none"
    click.echo(f"  web page {page}; admins {admins}")


def _user_field_warnings(config: Config) -> list[str]:
    """What the users' extra fields ask that popbox will not do, user by user."""
    from popbox.auth.passwdfile import NOPASSWORD, mail_fields
    from popbox.auth.restrictions import NET_FIELDS, NOT_SERVED_FIELDS, check_networks
    from popbox.store.location import parse_location

    try:
        records = passwd_users(config)
    except click.ClickException as exc:
        return [exc.message]
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


main.add_command(user_group)


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

    config = load(config_path)
    find_user(config, name)

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

    count, known = run_on_store(config, forget)
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
    expired retention, hidden messages past keep_days, Trash past trash_days. Then
    the archive's upkeep: what the archive disposition moved to Archive folders is
    archived, and the archive's retention applied. `popbox serve` does the same
    every mailbox.sweep_interval. Exit code 1 if some user's sweep failed.
    """
    from popbox.archive_upkeep import ArchiveSweep, sweep_archive
    from popbox.backends import build_archive
    from popbox.mailboxes import SweepSummary, describe_report, sweep_users

    config = load(config_path)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    records = passwd_users(config)
    if users:
        by_name = {record.name: record for record in records}
        unknown = [name for name in users if name not in by_name]
        if unknown:
            where = "PostgreSQL" if config.auth.backend == "postgresql" else config.auth.passwd_file
            raise click.ClickException(f"no user {', '.join(unknown)} in {where}")
        records = [by_name[name] for name in dict.fromkeys(users)]

    async def sweep(store: MailStore) -> tuple[SweepSummary, ArchiveSweep]:
        summary = await sweep_users(config.mailbox, store, records, now=now)
        archive = build_archive(config)
        try:
            return summary, await sweep_archive(config, archive, store, records, now=now)
        finally:
            await archive.close()

    summary, archived = run_on_store(config, sweep)
    if now is not None:
        click.echo(f"as if at {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(now))}")
    for item in summary.users:
        if item.report is not None and item.did_something:
            click.echo(f"{item.user}: {describe_report(item.report)}")
    click.echo(summary.describe())
    click.echo(archived.describe())
    if summary.failed or archived.failed:
        sys.exit(1)


main.add_command(import_group)
main.add_command(archive_group)
main.add_command(migrate_command)
main.add_command(backup_command)
main.add_command(restore_command)


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
