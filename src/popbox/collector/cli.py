"""``popbox fetch`` and the ``popbox oauth`` group: the collector's command line.

Exit codes, for cron jobs and systemd units:

- 0: every selected account was polled without error (or --status, --daemon ended);
- 1: at least one account failed (the others were still polled);
- 2: the configuration is wrong (a message names the key), an unknown --account, or
  an unknown quarantine ID;
- 3: an OAuth login needs signing in again (the message names the command); also
  from --status while the last run of some account ended so.

``--daemon`` keeps polling; SIGHUP makes it re-read the config (``run_daemon``).
``--quarantine`` lists quarantined messages with their IDs (``cli_quarantine``).

On a terminal a rich progress bar shows the run; otherwise each step is one log line
(``delivered account=... uid=... size=...``) on standard error. Run it as ``popbox
fetch`` (or ``python -m popbox fetch``, what the crash tests do): the composition root
(popbox.cli) hands it, through ``provide_local_delivery``, the way into local popbox
maildrops that a popbox sink needs. ``python -m popbox.collector.cli --config FILE``
runs the same command on its own, without that, so without the popbox sink.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from popbox.collector.base import LocalDeliveryFactory
from popbox.collector.cli_quarantine import (
    UnknownQuarantineId,
    list_quarantine,
    print_quarantine,
    resolve_ids,
)
from popbox.collector.config import AccountSettings, FetchSettings, load_fetch_settings
from popbox.collector.poll import PollObserver, PollResult
from popbox.collector.quarantine import Quarantine
from popbox.collector.scheduler import ConfigLoader, run_daemon, run_once
from popbox.collector.state import StateDB
from popbox.errors import ConfigError, PopboxError
from popbox.fileio import FileLock

if TYPE_CHECKING:
    # rich loads only for a terminal or --status: every cron run would pay its import.
    from rich.progress import Progress, TaskID

__all__ = [
    "EXIT_ACCOUNT_FAILED",
    "EXIT_CONFIG",
    "EXIT_LOGIN_REQUIRED",
    "EXIT_OK",
    "fetch_command",
    "oauth_group",
    "provide_local_delivery",
]

T = TypeVar("T")

log = logging.getLogger("popbox.collector")

EXIT_OK: Final = 0
EXIT_ACCOUNT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
EXIT_LOGIN_REQUIRED: Final = 3
CONFIG_ENV: Final = "POPBOX_CONFIG"
# What --retry-quarantined means without an ID (IDs are hex, so no ID reads "all").
RETRY_ALL: Final = "all"
# The key in click's context meta (shared by every nested context) under which the
# composition root leaves the popbox sink's LocalDeliveryFactory.
LOCAL_DELIVERY_META: Final = "popbox.collector.local_delivery"


def provide_local_delivery(ctx: click.Context, factory: LocalDeliveryFactory) -> None:
    """Give the ``fetch`` command run under ``ctx`` its way into local maildrops."""
    ctx.meta[LOCAL_DELIVERY_META] = factory


def _provided_local_delivery() -> LocalDeliveryFactory | None:
    factory: LocalDeliveryFactory | None = click.get_current_context().meta.get(
        LOCAL_DELIVERY_META
    )
    return factory


def _refuse_popbox_sinks(accounts: list[AccountSettings]) -> None:
    """Without a composition root there is no way into local popbox maildrops."""
    for account in accounts:
        for sink in account.sinks:
            if sink.kind in ("popbox", "archive"):
                raise ConfigError(
                    f"account {account.name}: sink {sink.label}: a popbox sink needs "
                    "`popbox fetch` (it delivers through the popbox server's rules)"
                )


class _ProgressObserver(PollObserver):
    """One rich progress bar per account (terminal only)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def planned(self, account: str, messages: int, octets: int) -> None:
        self._tasks[account] = self._progress.add_task(
            f"{account} ({messages} new)", total=max(octets, 1)
        )

    def message_done(self, account: str, octets: int, outcome: str) -> None:
        task = self._tasks.get(account)
        if task is not None:
            self._progress.advance(task, octets)


def _select(settings: FetchSettings, names: tuple[str, ...]) -> list[AccountSettings]:
    if not names:
        return [account for account in settings.accounts if account.enabled]
    return [settings.account(name) for name in names]


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _print_status(db: StateDB, accounts: list[AccountSettings]) -> bool:
    """Print the status table; True when some account needs a new OAuth login."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="popbox fetch status")
    for column in ("account", "last success", "last error", "delivered", "quarantined", "pending"):
        table.add_column(column)
    login_needed = False
    for status in asyncio.run(db.status([account.name for account in accounts])):
        error = Text("-")
        if status.login_required:
            login_needed = True
            error = Text(f"LOGIN NEEDED: {status.last_error}", style="bold red")
        elif status.last_error and (
            status.last_success is None or (status.last_error_at or 0) > status.last_success
        ):
            error = Text(f"{_when(status.last_error_at)}: {status.last_error}")
        table.add_row(
            status.account,
            _when(status.last_success),
            error,
            str(status.delivered),
            str(status.quarantined),
            str(status.pending),
        )
    Console().print(table)
    return login_needed


def _rich_handler() -> logging.Handler:
    from rich.console import Console
    from rich.logging import RichHandler

    return RichHandler(console=Console(stderr=True), show_path=False)


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (it is on Linux): its C event loop
    halves the loop's share of a download; asyncio's default loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _main(
    settings: FetchSettings,
    accounts: list[AccountSettings],
    db: StateDB,
    *,
    daemon: bool,
    retry_all: bool,
    retry_uids: dict[str, set[str]],
    observer: PollObserver | None,
    local_delivery: LocalDeliveryFactory | None,
    load: ConfigLoader,
) -> list[PollResult]:
    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Finish the message in hand, then QUIT cleanly: nothing is lost or doubled.
        loop.add_signal_handler(signum, stop.set)
    if daemon:
        loop.add_signal_handler(signal.SIGHUP, reload.set)
    try:
        if daemon:
            await run_daemon(
                settings,
                accounts,
                db,
                stop=stop,
                observer=observer,
                local_delivery=local_delivery,
                reload=reload,
                load=load,
            )
            return []
        return await run_once(
            settings,
            accounts,
            db,
            retry_quarantined=retry_all,
            retry_uids=retry_uids,
            stop=stop,
            observer=observer,
            local_delivery=local_delivery,
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _prepare_dirs(settings: FetchSettings) -> None:
    for path in (settings.state_dir, settings.spool_path, settings.quarantine_path):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)


@click.command(
    "fetch",
    epilog="Exit status: 0 all accounts polled, 1 some account failed, "
    "2 configuration error, 3 an OAuth login needs signing in again. "
    "See docs/collector.md.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    required=True,
    help="TOML file with a [fetch] table (also $POPBOX_CONFIG).",
)
@click.option("--account", "account_names", multiple=True, help="Only this account (repeatable).")
@click.option(
    "--daemon",
    is_flag=True,
    help="Keep polling every account on its interval; SIGHUP re-reads the config.",
)
@click.option("--status", is_flag=True, help="Show per-account state and exit.")
@click.option(
    "--quarantine",
    "list_quarantined",
    is_flag=True,
    help="List quarantined messages (ID, account, UIDL, reason, size, date) and exit.",
)
@click.option("--json", "as_json", is_flag=True, help="With --quarantine: as JSON.")
@click.option(
    "--retry-quarantined",
    "retry_ids",
    is_flag=False,
    flag_value=RETRY_ALL,
    multiple=True,
    metavar="[ID]",
    help="Offer quarantined messages to the sinks again: all, or the one with this ID "
    "(repeatable), in this run's poll of its account.",
)
@click.option(
    "--forget-quarantined",
    "forget_ids",
    multiple=True,
    metavar="ID",
    help="Drop a quarantined message for good: never offered again, left on the "
    "server (repeatable); no poll.",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def fetch_command(
    config_path: Path,
    account_names: tuple[str, ...],
    daemon: bool,
    status: bool,
    list_quarantined: bool,
    as_json: bool,
    retry_ids: tuple[str, ...],
    forget_ids: tuple[str, ...],
    verbose: bool,
) -> None:
    """Poll POP3 accounts and deliver every new message exactly once."""
    local_delivery = _provided_local_delivery()
    only_look = status or list_quarantined
    use_bar = sys.stderr.isatty() and not daemon and not verbose and not only_look
    if use_bar:
        # On a terminal the bar tells the story; only warnings (quarantine, failed
        # accounts) are printed, above the bar.
        logging.basicConfig(
            level=logging.WARNING,
            format="%(message)s",
            handlers=[_rich_handler()],
        )
    else:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )

    def load() -> tuple[FetchSettings, list[AccountSettings]]:
        """Read and validate the config file (again, on SIGHUP in daemon mode)."""
        settings = load_fetch_settings(config_path)
        accounts = _select(settings, account_names)
        if local_delivery is None and not only_look:
            _refuse_popbox_sinks(accounts)
        _prepare_dirs(settings)
        return settings, accounts

    try:
        settings, accounts = load()
        db = StateDB(settings.state_db_path)
    except PopboxError as exc:
        click.echo(f"popbox fetch: configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as exc:
        click.echo(f"popbox fetch: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        if status:
            sys.exit(EXIT_LOGIN_REQUIRED if _print_status(db, accounts) else EXIT_OK)
        quarantine = Quarantine(settings.quarantine_path)
        # Listed and forgotten: disabled accounts' messages too, unless --account.
        names = [a.name for a in (accounts if account_names else settings.accounts)]
        retry_all = RETRY_ALL in retry_ids
        picked = [text for text in retry_ids if text != RETRY_ALL]
        retry_uids: dict[str, set[str]] = {}
        if list_quarantined or forget_ids or picked:
            listing = asyncio.run(list_quarantine(db, quarantine, names))
            if list_quarantined:
                print_quarantine(listing, as_json=as_json)
                sys.exit(EXIT_OK)
            try:
                retry_uids = resolve_ids(picked, listing)
                forget = resolve_ids(forget_ids, listing)
            except UnknownQuarantineId as exc:
                click.echo(f"popbox fetch: {exc} (see `popbox fetch --quarantine`)", err=True)
                sys.exit(EXIT_CONFIG)
            unpolled = sorted(set(retry_uids) - {account.name for account in accounts})
            if unpolled:
                click.echo(
                    f"popbox fetch: --retry-quarantined: account {unpolled[0]} is not "
                    "polled in this run (disabled?)",
                    err=True,
                )
                sys.exit(EXIT_CONFIG)
            if forget_ids:
                asyncio.run(_forget(settings, db, quarantine, forget))
                click.echo(f"popbox fetch: forgot {sum(map(len, forget.values()))} message(s)")
                sys.exit(EXIT_OK)
        if not accounts:
            click.echo("popbox fetch: no accounts configured", err=True)
            sys.exit(EXIT_CONFIG)

        def run(observer: PollObserver | None) -> list[PollResult]:
            return _run_loop(
                _main(
                    settings,
                    accounts,
                    db,
                    daemon=daemon,
                    retry_all=retry_all,
                    retry_uids=retry_uids,
                    observer=observer,
                    local_delivery=local_delivery,
                    load=load,
                )
            )

        if use_bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
            ) as progress:
                results = run(_ProgressObserver(progress))
        else:
            results = run(None)
    finally:
        db.close()
    failed = [result for result in results if not result.ok]
    for result in failed:
        if result.login_required:
            click.secho(
                f"popbox fetch: {result.account}: LOGIN NEEDED: {result.error}",
                err=True,
                fg="red",
                bold=True,
            )
        else:
            click.echo(f"popbox fetch: {result.account}: {result.error}", err=True)
    if any(result.login_required for result in failed):
        sys.exit(EXIT_LOGIN_REQUIRED)
    sys.exit(EXIT_ACCOUNT_FAILED if failed else EXIT_OK)


async def _forget(
    settings: FetchSettings, db: StateDB, quarantine: Quarantine, chosen: dict[str, set[str]]
) -> None:
    """Drop quarantined messages for good: recorded as skipped, so no poll offers them
    again (they stay on the server), and their quarantine files removed."""
    for account, uids in chosen.items():
        # Not in the middle of a poll of the account (a daemon's): wait for its end.
        lock = settings.state_dir / "locks" / f"{account}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with await asyncio.to_thread(FileLock, lock, wait=True):
            records = await db.records(account)
            for uid in sorted(uids):
                await db.clear_quarantine(account, uid)
                await db.record_skipped(account, uid, records[uid].size, "forgotten")
                quarantine.remove(account, uid)
                log.info("forgotten account=%s uid=%s", account, uid)


class _LazyOAuthGroup(click.Group):
    """Loads ``popbox.collector.oauth.login_command`` (``status_command``) only when
    ``oauth`` is used, so msal is never imported by ``popbox fetch`` for password accounts."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["login", "status"]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in ("login", "status"):
            return None
        try:
            module = importlib.import_module("popbox.collector.oauth")
        except ImportError as exc:
            raise click.ClickException(f"OAuth support is unavailable: {exc}") from exc
        command = getattr(module, f"{cmd_name}_command", None)
        return command if isinstance(command, click.Command) else None


@click.group("oauth", cls=_LazyOAuthGroup)
def oauth_group() -> None:
    """OAuth2 for collector accounts (Microsoft 365, Gmail): `popbox oauth login ACCOUNT`."""


if __name__ == "__main__":
    # `python -m popbox.collector.cli --config FILE`: the fetch command on its own.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    fetch_command()
