"""``popbox import``: take over mail and UIDLs from the server popbox replaces.

The command line of popbox.migrate (docs/migration.md). Every subcommand plans a
user's whole mailbox before it writes anything, reports per user, and may be run
again: what a former (or killed) run did is recognised and not done twice.

Exit codes: 0 every user was imported (problems met are reported with the decision
taken); 1 some user's import failed (the others went on); 2 a usage error.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import click

from popbox.errors import MaildropInUse, PopboxError

if TYPE_CHECKING:
    from popbox.config import Config
    from popbox.migrate.run import ImportOutcome, SourceKind
    from popbox.migrate.template import UidlTemplate
    from popbox.store.maildir import MaildirStore

__all__ = ["import_group"]


def _config(config_path: Path | None) -> Config:
    from popbox.config import load_config

    try:
        return load_config(config_path)
    except PopboxError as exc:
        raise click.ClickException(f"configuration: {exc}") from exc


def _store(config: Config) -> MaildirStore:
    from popbox.backends import build_store
    from popbox.store.maildir import MaildirStore

    store = build_store(config)
    if not isinstance(store, MaildirStore):
        raise click.ClickException("popbox import needs the Maildir store")
    return store


def _users(config: Config, user: str | None, every: bool) -> list[str]:
    from popbox.auth.admin import list_users

    if every == (user is not None):
        raise click.UsageError("give exactly one of --user USER and --all")
    try:
        names = [record.name for record in list_users(config.auth.passwd_file)]
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if every:
        return names
    assert user is not None
    if user not in names:
        raise click.ClickException(f"no user {user} in {config.auth.passwd_file}: add them first")
    return [user]


@dataclass(frozen=True, slots=True)
class _Options:
    config: Config
    users: list[str]
    every: bool
    maildir: Path | None
    copy: bool
    dry_run: bool
    as_json: bool
    verbose: bool


def _emit(outcomes: list[ImportOutcome], options: _Options) -> None:
    from popbox.migrate.run import as_json, describe

    if options.as_json:
        data = [as_json(outcome, dry_run=options.dry_run) for outcome in outcomes]
        click.echo(json.dumps(data, indent=2))
        return
    for outcome in outcomes:
        for line in describe(outcome, dry_run=options.dry_run, verbose=options.verbose):
            click.echo(line)


def _failure(exc: PopboxError | OSError) -> str:
    """What an import that stopped on ``exc`` reports, with what to do about it."""
    if isinstance(exc, MaildropInUse):
        return (
            f"{exc}: a POP3 session or another import holds the folder; nothing more "
            "was imported: run the import again once it is free"
        )
    return str(exc)


def _source_dir(options: _Options, store: MaildirStore, user: str) -> Path:
    if options.maildir is None:
        return store.maildir(user)
    return options.maildir / user if options.every else options.maildir


def _run_maildir(
    kind: SourceKind, options: _Options, template: UidlTemplate | None, reuse: bool
) -> None:
    from popbox.migrate.run import ImportOutcome, apply_plan, plan_maildir

    store = _store(options.config)
    outcomes: list[ImportOutcome] = []

    async def run() -> None:
        try:
            for user in options.users:
                source = _source_dir(options, store, user)
                target = store.maildir(user)
                plan = plan_maildir(
                    kind, user, source, copy=options.copy, template=template, reuse_xuidl=reuse
                )
                if plan.refusal is not None:
                    outcome = ImportOutcome(plan)
                elif not options.copy and source.resolve() != target.resolve():
                    outcome = ImportOutcome(plan)
                    outcome.error = (
                        f"{source} is not {user}'s Maildir in popbox's store ({target}): "
                        "use --copy to copy it in, or point storage.mail_location (or "
                        "maildir_root) at the old tree"
                    )
                elif options.dry_run:
                    outcome = ImportOutcome(plan)
                else:
                    try:
                        outcome = await apply_plan(
                            store, plan, copy=options.copy, mapping_dir=target
                        )
                    except (PopboxError, OSError) as exc:
                        outcome = ImportOutcome(plan, error=_failure(exc))
                outcomes.append(outcome)
        finally:
            await store.close()

    asyncio.run(run())
    _emit(outcomes, options)
    if any(outcome.error is not None or outcome.plan.refusal for outcome in outcomes):
        sys.exit(1)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="POPBOX_CONFIG",
    help="popbox's TOML configuration (the store and the passwd file to import into).",
)


_MAILDIR_OPTIONS: Final = (
    _config_option,
    click.option("--user", "user", help="The popbox user to import (see --all)."),
    click.option("--all", "every", is_flag=True, help="Every user of popbox's passwd file."),
    click.option(
        "--maildir",
        type=click.Path(file_okay=False, path_type=Path),
        help="The old Maildir (with --all: the directory holding one per user). "
        "Default: the user's Maildir in popbox's store, used in place.",
    ),
    click.option(
        "--copy",
        is_flag=True,
        help="Copy the messages into popbox's store instead of using the Maildir in place.",
    ),
    click.option("--dry-run", is_flag=True, help="Plan and report; write nothing."),
    click.option("--json", "as_json", is_flag=True, help="Report as JSON."),
    click.option("-v", "--verbose", is_flag=True, help="List new messages too."),
)


@click.group("import")
def import_group() -> None:
    """Take over mail and its UIDLs from the server popbox replaces, so that clients
    that leave mail on the server download nothing again (docs/migration.md)."""


def _maildir_command(name: str) -> Callable[[Callable[..., None]], click.Command]:
    """A ``popbox import NAME`` subcommand reading Maildirs: the options every such
    source shares come first, and the body is called with them as ``_Options`` and
    its own options (those decorated under this one) as keywords."""

    def decorate(body: Callable[..., None]) -> click.Command:
        @functools.wraps(body, updated=())
        def command(
            config_path: Path | None,
            user: str | None,
            every: bool,
            maildir: Path | None,
            copy: bool,
            dry_run: bool,
            as_json: bool,
            verbose: bool,
            **own: Any,
        ) -> None:
            config = _config(config_path)
            users = _users(config, user, every)
            options = _Options(config, users, every, maildir, copy, dry_run, as_json, verbose)
            body(options, **own)

        # The body's own options, then the shared ones above them: listed first in --help.
        command.__click_params__ = list(getattr(body, "__click_params__", []))  # type: ignore[attr-defined]
        for option in reversed(_MAILDIR_OPTIONS):
            command = option(command)
        return import_group.command(name)(command)

    return decorate


@_maildir_command("dovecot")
@click.option(
    "--uidl-format",
    default=None,
    metavar="FORMAT",
    help="Dovecot's pop3_uidl_format (default %08Xu%08Xv, Dovecot's default).",
)
@click.option("--reuse-xuidl", is_flag=True, help="Dovecot ran with pop3_reuse_xuidl = yes.")
def import_dovecot(options: _Options, uidl_format: str | None, reuse_xuidl: bool) -> None:
    """A Dovecot Maildir: dovecot-uidlist and pop3_uidl_format."""
    from popbox.migrate.run import SourceKind
    from popbox.migrate.template import DEFAULT_UIDL_FORMAT, TemplateError, UidlTemplate

    try:
        template = UidlTemplate(uidl_format or DEFAULT_UIDL_FORMAT)
    except TemplateError as exc:
        raise click.BadParameter(str(exc), param_hint="--uidl-format") from exc
    _run_maildir(SourceKind.DOVECOT, options, template, reuse_xuidl)


@_maildir_command("courier")
def import_courier(options: _Options) -> None:
    """A Courier Maildir: courierpop3dsizelist (or file names, before Courier kept it)."""
    from popbox.migrate.run import SourceKind

    _run_maildir(SourceKind.COURIER, options, None, False)


@_maildir_command("x-uidl")
def import_xuidl(options: _Options) -> None:
    """A Maildir whose messages carry X-UIDL headers (qpopper, UW ipop3d)."""
    from popbox.migrate.run import SourceKind

    _run_maildir(SourceKind.XUIDL, options, None, False)


@import_group.command("pop3")
@_config_option
@click.option("--host", required=True, help="The old POP3 server.")
@click.option("--port", type=click.IntRange(1, 65535), help="Default 995 (implicit TLS), else 110.")
@click.option(
    "--tls",
    type=click.Choice(["implicit", "starttls", "none"]),
    default="implicit",
    show_default=True,
    help="How the connection is secured; 'none' also needs --allow-plaintext-password.",
)
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--tls-fingerprint", help="SHA-256 of the server's certificate (pins it).")
@click.option("--user", "login", required=True, help="The login name on the old server.")
@click.option(
    "--password-file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A file whose first line is the password.",
)
@click.option(
    "--auth",
    "mechanism",
    type=click.Choice(["auto", "user", "plain", "login", "apop"]),
    default="auto",
    show_default=True,
)
@click.option("--allow-plaintext-password", is_flag=True)
@click.option("--to", "target", required=True, help="The popbox user who receives the mail.")
@click.option("--folder", default="INBOX", show_default=True, help="The popbox folder.")
@click.option("--dry-run", is_flag=True, help="Log in, list and plan; fetch nothing.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@click.option("-v", "--verbose", is_flag=True)
def import_pop3(
    config_path: Path | None,
    host: str,
    port: int | None,
    tls: Literal["implicit", "starttls", "none"],
    ca_file: Path | None,
    tls_fingerprint: str | None,
    login: str,
    password_file: Path,
    mechanism: str,
    allow_plaintext_password: bool,
    target: str,
    folder: str,
    dry_run: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Any POP3 server you can log in to: fetch every message with its UIDL (nothing is
    deleted there). Run it again after a failure: it goes on where it stopped."""
    from pydantic import ValidationError

    from popbox.collector.config import AccountSettings
    from popbox.migrate.live import LiveSource, live_import, live_plan
    from popbox.migrate.plan import UserPlan
    from popbox.migrate.run import ImportOutcome
    from popbox.store.mailbox import check_folder_name

    config = _config(config_path)
    _users(config, target, False)
    try:
        folder = check_folder_name(folder)
        account = AccountSettings(
            name="import",
            host=host,
            port=port,
            security="tls" if tls == "implicit" else tls,
            ca_file=ca_file,
            tls_fingerprint=tls_fingerprint,
            username=login,
            auth_mechanism=mechanism,  # type: ignore[arg-type]
            password_file=password_file,
            allow_plaintext_password=allow_plaintext_password,
            sinks=[{"kind": "popbox", "user": target}],  # type: ignore[list-item]
        )
    except (ValidationError, PopboxError) as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        password = password_file.read_text().splitlines()[0]
    except (OSError, IndexError) as exc:
        raise click.ClickException(f"cannot read a password from {password_file}") from exc
    source = LiveSource(account, password)
    store = _store(config)
    spool = config.data_dir / "import-spool"

    async def run() -> ImportOutcome:
        try:
            if dry_run:
                folder_plan = await live_plan(source, folder)
                return ImportOutcome(UserPlan(target, f"pop3 {login}@{host}", [folder_plan]))
            folder_plan, result = await live_import(source, store, target, folder, spool)
            user_plan = UserPlan(target, f"pop3 {login}@{host}", [folder_plan])
            from popbox.migrate.apply import write_mapping

            outcome = ImportOutcome(user_plan, [result])
            outcome.mapping = write_mapping(user_plan, store.maildir(target))
            return outcome
        finally:
            await store.close()

    try:
        outcome = asyncio.run(run())
    except (PopboxError, OSError) as exc:
        raise click.ClickException(_failure(exc)) from exc
    options = _Options(config, [target], False, None, True, dry_run, as_json, verbose)
    _emit([outcome], options)
