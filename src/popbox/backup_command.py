"""``popbox backup DEST`` and ``popbox restore SRC``: the command line of popbox.backup.

Exit codes of ``backup``: 0 a complete snapshot was written; 1 it could not be (the
reason on stderr); 3 a snapshot of the local files was written but popbox keeps
something in PostgreSQL, which popbox backup does not copy (``--local-only`` says
that is known, and makes it 0). ``restore``: 0 restored; 1 refused or failed, with
nothing written when the snapshot does not match its manifest or the target is not
empty.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Final

import click

from popbox.cli_support import config_option, load
from popbox.errors import PopboxError

__all__ = ["backup_command", "restore_command"]

# backup's exit code when a snapshot was written without what PostgreSQL holds.
EXIT_NOT_INCLUDED: Final = 3


def _say(line: str) -> None:
    click.echo(line, err=True)


@click.command("backup")
@config_option
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--local-only",
    is_flag=True,
    help="Exit 0 although mail, users or the archive are in PostgreSQL (backed up apart).",
)
@click.option("--json", "as_json", is_flag=True, help="The outcome as JSON on stdout.")
def backup_command(config_path: Path | None, dest: Path, local_only: bool, as_json: bool) -> None:
    """Write a consistent snapshot of popbox's files into DEST/<UTC time>/.

    Safe while popbox serves: each Maildir folder is taken under its lock, SQLite
    databases through SQLite's online backup. Unchanged messages and archive objects
    are hard links to the newest earlier snapshot in DEST.
    """
    from popbox.backup import take_snapshot

    config = load(config_path)
    try:
        result = take_snapshot(config, dest, progress=_say)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest, stats = result.manifest, result.stats
    messages = sum(manifest.messages_of(user) for user in manifest.mailboxes)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "snapshot": str(result.path),
                    "previous": str(result.previous) if result.previous else None,
                    "users": len(manifest.users),
                    "mailboxes": len(manifest.mailboxes),
                    "messages": messages,
                    "files": len(manifest.files),
                    "linked": stats.linked,
                    "copied": stats.copied,
                    "copied_octets": stats.copied_octets,
                    "databases": stats.databases,
                    "not_included": manifest.not_included,
                }
            )
        )
    else:
        click.echo(
            f"{result.path}: {len(manifest.users)} users, {messages} messages in "
            f"{len(manifest.mailboxes)} mailboxes, {len(manifest.files)} files "
            f"({stats.linked} linked, {stats.copied} copied, {stats.copied_octets} octets), "
            f"{stats.databases} databases"
        )
    if manifest.not_included and not local_only:
        for note in manifest.not_included:
            _say(f"Error: {note}")
        sys.exit(EXIT_NOT_INCLUDED)


@click.command("restore")
@config_option
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace what the configured places hold.")
def restore_command(config_path: Path | None, src: Path, force: bool) -> None:
    """Restore a snapshot (SRC, or the newest in SRC) into the configured places.

    Every file is checked against the manifest first. Stop popbox before restoring.
    """
    from popbox.backup import restore_snapshot

    config = load(config_path)
    try:
        result = restore_snapshot(config, src, force=force, progress=_say)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = result.manifest
    messages = sum(manifest.messages_of(user) for user in manifest.mailboxes)
    click.echo(
        f"restored {result.snapshot.name}: {len(manifest.users)} users, {messages} messages, "
        f"{result.files} files, {result.octets} octets"
    )
    for note in manifest.not_included:
        _say(f"not in the snapshot: {note}")
