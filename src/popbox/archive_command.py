"""`popbox archive`: the archive from the command line (docs/archive.md) — export,
import, search, show, cat, hold, release, delete, usage, reindex, expire.

Every subcommand reads the server's configuration (``--config``) and opens the
archive it names. Exit codes: 0 done; 1 the archive, the user, a query or a path
was wrong (the message says which; never a traceback); 2 a usage error.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from popbox.backends import build_archive
from popbox.cli_support import config_option, load, passwd_users, run_admin
from popbox.errors import PopboxError

if TYPE_CHECKING:
    from popbox.archive.base import Archive, Entry, Hit, Query, SearchPage
    from popbox.archive.export import ExportResult
    from popbox.archive.importer import ImportReport
    from popbox.config import Config

__all__ = ["archive_group"]

T = TypeVar("T")

# Ids handed to one set_hold call when a query picks them: a bounded list per call
# however many messages match.
HOLD_CHUNK: Final = 1000


@click.group("archive")
def archive_group() -> None:
    """The archive: kept copies of every user's mail, searchable (docs/archive.md)."""


def _run(config: Config, work: Callable[[Archive], Awaitable[T]]) -> T:
    """Run ``work`` on the archive and close it; any popbox or OS error exits 1."""
    try:
        archive = build_archive(config)
    except (PopboxError, OSError) as exc:
        raise click.ClickException(f"archive: {exc}") from exc

    async def run() -> T:
        try:
            return await work(archive)
        finally:
            await archive.close()

    try:
        return asyncio.run(run())
    except (PopboxError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def _query(text: str) -> Query:
    from popbox.archive.query import parse_query
    from popbox.errors import InvalidQuery

    try:
        return parse_query(text)
    except InvalidQuery as exc:
        raise click.ClickException(f"query: {exc}") from exc


def _in_passdb(config: Config, user: str) -> bool:
    return run_admin(config, lambda admin: admin.find_user(user)) is not None


async def _require_user(archive: Archive, user: str, known: bool) -> None:
    """A user is one of the user database's, or one the archive still keeps mail of."""
    if known or any(usage.user == user for usage in await archive.users()):
        return
    raise click.ClickException(f"no user {user} in the user database nor in the archive")


def _date(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _human(octets: int) -> str:
    size = float(octets)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{octets} B"


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


@archive_group.command("export")
@config_option
@click.argument("user")
@click.argument("query", default="")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mbox", "maildir", "eml-zip"]),
    default="mbox",
    show_default=True,
    help="mbox (mboxrd), a Maildir (cur/, seen), or a zip of .eml files.",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="The file (mbox, eml-zip) or directory (maildir) to write; must not exist, "
    "unless it is an interrupted export of the same, which is then finished.",
)
def export_command(config_path: Path | None, user: str, query: str, fmt: str, output: Path) -> None:
    """Write USER's messages matching QUERY (all without one) to --output.

    An interrupted export, run again with the same arguments, goes on where it
    stopped (its state is in OUTPUT.popbox-export until it ends).
    """
    from popbox.archive.export import ExportFormat, export_messages

    config = load(config_path)
    parsed = _query(query)
    if not output.parent.is_dir():
        raise click.ClickException(f"{output.parent} is not a directory")
    known = _in_passdb(config, user)

    async def work(archive: Archive) -> ExportResult:
        await _require_user(archive, user, known)
        if not _stderr_is_terminal():
            return await export_messages(archive, user, parsed, ExportFormat(fmt), output)
        from rich.console import Console
        from rich.progress import Progress

        total = (await archive.search(user, parsed, limit=1)).total
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"export {user}", total=total)

            def advance(written: int, entry: Entry) -> None:
                progress.update(task, completed=written)

            return await export_messages(
                archive, user, parsed, ExportFormat(fmt), output, on_message=advance
            )

    result = _run(config, work)
    resumed = f" ({result.resumed} of them by an earlier run)" if result.resumed else ""
    click.echo(f"{result.messages} messages ({_human(result.octets)}) to {result.output}{resumed}")
    if result.vanished:
        click.echo(f"{result.vanished} messages were removed from the archive meanwhile", err=True)


@archive_group.command("import")
@config_option
@click.argument("user")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--folder",
    metavar="NAME",
    help="The folder to file the messages in (a tree's subfolders go below it); "
    "default: INBOX, or an mbox's file name.",
)
def import_command(config_path: Path | None, user: str, path: Path, folder: str | None) -> None:
    """Keep the messages of PATH for USER: an mbox (Thunderbird's too), a Maildir,
    a directory of .eml files, or a Thunderbird folder tree.

    Messages already kept are recognised and counted, not stored again: a killed
    import run again just goes on.
    """
    from popbox.archive.importer import import_path
    from popbox.archive.sources import source_octets

    config = load(config_path)
    if not path.exists():
        raise click.ClickException(f"{path} does not exist")
    if not _in_passdb(config, user):
        raise click.ClickException(f"no user {user} in the user database: add them first")

    async def work(archive: Archive) -> ImportReport:
        if not _stderr_is_terminal():
            return await import_path(archive, user, path, folder=folder)
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        total = await asyncio.to_thread(source_octets, path)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as progress:
            task = progress.add_task(f"import {path.name}", total=total or None)

            def advance(report: ImportReport) -> None:
                progress.update(
                    task,
                    completed=report.octets,
                    description=f"import {path.name}: {report.messages} messages",
                )

            return await import_path(archive, user, path, folder=folder, progress=advance)

    report = _run(config, work)
    for problem in report.problems:
        click.echo(f"unreadable: {problem.where}: {problem.reason}", err=True)
    if report.unreadable > len(report.problems):
        click.echo(f"... and {report.unreadable - len(report.problems)} more", err=True)
    click.echo(f"{user}: {report.describe()}")


@archive_group.command("search")
@config_option
@click.argument("user")
@click.argument("query")
@click.option("--limit", type=click.IntRange(1), default=None, help="Results per page.")
@click.option("--offset", type=click.IntRange(0), default=0, help="Results to skip.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def search_command(
    config_path: Path | None, user: str, query: str, limit: int | None, offset: int, as_json: bool
) -> None:
    """USER's messages matching QUERY, newest first (as the web page shows them)."""
    from popbox.archive.base import DEFAULT_PAGE, MAX_PAGE

    config = load(config_path)
    parsed = _query(query)
    known = _in_passdb(config, user)
    if limit is not None and limit > MAX_PAGE:
        raise click.BadParameter(f"at most {MAX_PAGE}", param_hint="--limit")

    async def work(archive: Archive) -> SearchPage:
        await _require_user(archive, user, known)
        return await archive.search(user, parsed, limit=limit or DEFAULT_PAGE, offset=offset)

    page = _run(config, work)
    if as_json:
        hits = [_hit_json(hit) for hit in page.hits]
        click.echo(json.dumps({"total": page.total, "offset": offset, "hits": hits}, indent=2))
        return
    if sys.stdout.isatty():
        _print_hits_table(page, offset)
        return
    for hit in page.hits:
        entry = hit.entry
        snippet = "".join(f"**{text}**" if matched else text for text, matched in hit.snippet.parts)
        fields = [str(entry.id), _date(entry.sort_time), entry.sender, entry.subject, snippet]
        click.echo("\t".join(field.replace("\t", " ").replace("\n", " ") for field in fields))
    click.echo(f"{offset + 1 if page.hits else 0}-{offset + len(page.hits)} of {page.total}")


def _print_hits_table(page: SearchPage, offset: int) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("date", "from", "subject", "id", "snippet")
    for hit in page.hits:
        snippet = Text()
        for text, matched in hit.snippet.parts:
            snippet.append(text, style="bold reverse" if matched else None)
        entry = hit.entry
        table.add_row(_date(entry.sort_time), entry.sender, entry.subject, str(entry.id), snippet)
    console = Console()
    console.print(table)
    first = offset + 1 if page.hits else 0
    console.print(f"{first}-{offset + len(page.hits)} of {page.total}", highlight=False)


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "date": entry.date,
        "received": entry.received,
        "from": entry.sender,
        "to": entry.recipients,
        "subject": entry.subject,
        "message_id": entry.message_id,
        "size": entry.size,
        "digest": entry.digest,
        "folder": entry.folder,
        "source": entry.source.value,
        "attachments": list(entry.attachments),
        "hold": entry.hold,
    }


def _hit_json(hit: Hit) -> dict[str, Any]:
    return {
        **_entry_json(hit.entry),
        "snippet": hit.snippet.text,
        "snippet_parts": [[text, matched] for text, matched in hit.snippet.parts],
    }


@archive_group.command("show")
@config_option
@click.argument("user")
@click.argument("entry_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_command(config_path: Path | None, user: str, entry_id: int, as_json: bool) -> None:
    """What the archive knows of one of USER's messages (headers, size, hold)."""
    config = load(config_path)
    entry = _run(config, lambda archive: archive.entry(user, entry_id))
    if as_json:
        click.echo(json.dumps(_entry_json(entry), indent=2))
        return
    rows = [
        ("Id", str(entry.id)),
        ("Date", _date(entry.date)),
        ("From", entry.sender),
        ("To", entry.recipients),
        ("Subject", entry.subject),
        ("Message-ID", entry.message_id),
        ("Size", f"{entry.size} octets"),
        ("Attachments", ", ".join(name or "(unnamed)" for name in entry.attachments) or "-"),
        ("Folder", entry.folder),
        ("Came", f"{_date(entry.received)} ({entry.source.value})"),
        ("Held", "yes" if entry.hold else "no"),
        ("SHA-256", entry.digest),
    ]
    for name, value in rows:
        click.echo(f"{name + ':':13}{value}")


@archive_group.command("cat")
@config_option
@click.argument("user")
@click.argument("entry_id", metavar="ID", type=int)
def cat_command(config_path: Path | None, user: str, entry_id: int) -> None:
    """Write one of USER's messages to stdout, exactly as kept."""
    config = load(config_path)
    out = sys.stdout.buffer

    async def work(archive: Archive) -> None:
        # The entry first: an unknown id fails before anything is written.
        await archive.entry(user, entry_id)
        async for chunk in archive.read(user, entry_id):
            out.write(chunk)
        out.flush()

    _run(config, work)


def _set_hold(
    config_path: Path | None, user: str, query: str | None, ids: tuple[int, ...], hold: bool
) -> None:
    from popbox.archive.base import MatchAll

    if ids and query:
        raise click.UsageError("give a QUERY or --id, not both")
    config = load(config_path)
    parsed = _query(query or "")
    known = _in_passdb(config, user)

    async def work(archive: Archive) -> int:
        await _require_user(archive, user, known)
        if ids:
            return await archive.set_hold(user, list(ids), hold)
        if isinstance(parsed, MatchAll):
            return await archive.set_hold(user, None, hold)
        changed = 0
        # Collected first: changing holds while the walk reads could disturb it.
        matched = [entry.id async for entry in archive.entries(user, parsed)]
        for start in range(0, len(matched), HOLD_CHUNK):
            chunk = matched[start : start + HOLD_CHUNK]
            changed += await archive.set_hold(user, chunk, hold)
        return changed

    changed = _run(config, work)
    click.echo(f"{user}: {changed} messages {'put on hold' if hold else 'released'}")


_ids_option = click.option(
    "--id", "ids", type=int, multiple=True, metavar="ID", help="A message's id (repeatable)."
)


@archive_group.command("hold")
@config_option
@click.argument("user")
@click.argument("query", required=False)
@_ids_option
def hold_command(
    config_path: Path | None, user: str, query: str | None, ids: tuple[int, ...]
) -> None:
    """Put USER's messages under legal hold (matching QUERY, the --id ones, or all):
    neither retention nor delete removes them."""
    _set_hold(config_path, user, query, ids, True)


@archive_group.command("release")
@config_option
@click.argument("user")
@click.argument("query", required=False)
@_ids_option
def release_command(
    config_path: Path | None, user: str, query: str | None, ids: tuple[int, ...]
) -> None:
    """Release USER's messages from legal hold (matching QUERY, the --id ones, or all)."""
    _set_hold(config_path, user, query, ids, False)


@archive_group.command("delete")
@config_option
@click.argument("user")
@_ids_option
def delete_command(config_path: Path | None, user: str, ids: tuple[int, ...]) -> None:
    """Remove USER's --id messages from the archive (none if any is on hold)."""
    if not ids:
        raise click.UsageError("name the messages to delete with --id")
    config = load(config_path)
    removed = _run(config, lambda archive: archive.delete(user, list(ids)))
    click.echo(f"{user}: {removed} messages deleted")


@archive_group.command("usage")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def usage_command(config_path: Path | None, as_json: bool) -> None:
    """Every user's share of the archive: messages, octets, held."""
    config = load(config_path)
    usages = _run(config, lambda archive: archive.users())
    if as_json:
        rows = [
            {"user": u.user, "messages": u.messages, "octets": u.octets, "held": u.held}
            for u in usages
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("user", "messages", "size", "held")
    for usage in usages:
        table.add_row(usage.user, str(usage.messages), _human(usage.octets), str(usage.held))
    Console().print(table)


@archive_group.command("reindex")
@config_option
@click.argument("user", required=False)
def reindex_command(config_path: Path | None, user: str | None) -> None:
    """Rebuild the search index from the kept messages (USER's, or everyone's)."""
    config = load(config_path)
    count = _run(config, lambda archive: archive.reindex(user))
    click.echo(f"{count} messages indexed")


def _moment(ctx: click.Context, param: click.Parameter, text: str | None) -> float | None:
    if text is None:
        return None
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


@archive_group.command("expire")
@config_option
@click.option(
    "--now",
    metavar="ISO-8601|EPOCH",
    callback=_moment,
    help="Act as if it were this time (to try a policy, or in tests). Removals are real.",
)
def expire_command(config_path: Path | None, now: float | None) -> None:
    """Remove what each user's retention lets go (archive.retention_days, the
    domain's, the user's popbox_archive_days); held messages stay. For cron."""
    config = load(config_path)
    extras = {record.name: record.extra for record in passwd_users(config)}
    moment = time.time() if now is None else now

    async def work(archive: Archive) -> list[tuple[str, int]]:
        removed: list[tuple[str, int]] = []
        for usage in await archive.users():
            # A user gone from the user database keeps the server's and domain's rule.
            policy = config.archive.policy_for(usage.user, extras.get(usage.user, {}))
            if policy.retention_days is not None:
                count = await archive.expire(usage.user, policy.retention_days, moment)
                removed.append((usage.user, count))
        return removed

    removed = _run(config, work)
    for user, count in removed:
        if count:
            click.echo(f"{user}: {count} messages expired")
    click.echo(f"{sum(count for _, count in removed)} messages expired in all")
