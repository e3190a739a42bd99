"""``popbox migrate``: move mailboxes between the Maildir and the PostgreSQL store.

The command line of popbox.migrate.move (docs/migration.md, "Moving mailboxes between
Maildir and PostgreSQL"). Both stores are built from the same configuration: the
Maildirs of ``storage.maildir_root``/``mail_location`` and the database of
``[postgresql]``. Each user moves whole, every folder with every UIDL, message number
and device state; the server keeps serving meanwhile when ``storage.moving_from``
names the source. A killed run may be run again: it resumes, and users moved
already are reported and skipped.

Exit codes: 0 every user was moved (or had been); 1 some user's move failed (each is
named, the others went on); 2 a usage error.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

from popbox.cli_support import config_option, load
from popbox.errors import PopboxError

if TYPE_CHECKING:
    from popbox.config import Config
    from popbox.migrate.move import MovableStore, MoveOptions, UserMove
    from popbox.store.moves import MoveMarks

__all__ = ["migrate_command"]

DIRECTIONS: Final = ("maildir-to-postgresql", "postgresql-to-maildir")


@dataclass(slots=True)
class _Sides:
    source: MovableStore
    target: MovableStore
    marks: MoveMarks
    source_marks: MoveMarks

    async def close(self) -> None:
        for closing in (self.source, self.target, self.marks, self.source_marks):
            await closing.close()


def _sides(config: Config, direction: str) -> _Sides:
    """Both stores and their move marks, the source first."""
    from popbox.backends import (
        build_maildir_store,
        build_move_marks,
        build_postgresql_store,
    )

    maildir = build_maildir_store(config)
    postgresql: MovableStore = build_postgresql_store(config)
    maildir_marks = build_move_marks(config, "maildir", maildir)
    postgresql_marks = build_move_marks(config, "postgresql", postgresql)
    if direction == "maildir-to-postgresql":
        return _Sides(maildir, postgresql, postgresql_marks, maildir_marks)
    return _Sides(postgresql, maildir, maildir_marks, postgresql_marks)


def _all_users(config: Config) -> list[str]:
    from popbox.auth.base import UserDirectory
    from popbox.backends import build_passdb

    passdb = build_passdb(config)
    if not isinstance(passdb, UserDirectory):
        raise click.ClickException("the user database cannot list its users: name them")
    return [record.name for record in passdb.users()]


def _describe(move: UserMove, dry_run: bool) -> str:
    if move.error is not None:
        return f"{move.user}: FAILED: {move.error}"
    if move.already:
        return f"{move.user}: moved already, skipped"
    what = f"{move.folders} folders, {move.messages} messages, {move.octets} octets"
    if dry_run:
        return f"{move.user}: would move {what}"
    return f"{move.user}: moved {what} ({move.copied} copied by this run)"


def _summary(moves: list[UserMove], dry_run: bool) -> dict[str, object]:
    done = [m for m in moves if m.error is None and not m.already]
    return {
        "dry_run": dry_run,
        "users": len(done),
        "folders": sum(m.folders for m in done),
        "messages": sum(m.messages for m in done),
        "octets": sum(m.octets for m in done),
        "skipped": sum(1 for m in moves if m.already and m.error is None),
        "failed": [m.user for m in moves if m.error is not None],
    }


async def run_moves(
    sides: _Sides, users: list[str], options: MoveOptions, *, quiet: bool
) -> list[UserMove]:
    from popbox.migrate.move import move_user

    def progress(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    moves: list[UserMove] = []
    for user in users:
        move = await move_user(
            sides.source,
            sides.target,
            sides.marks,
            user,
            source_marks=sides.source_marks,
            options=options,
            progress=progress,
        )
        moves.append(move)
        progress(_describe(move, options.dry_run))
    return moves


@click.command("migrate")
@config_option
@click.argument("direction", type=click.Choice(DIRECTIONS))
@click.argument("users", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every user of the user database.")
@click.option("--dry-run", is_flag=True, help="Say what would move; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="The outcome as JSON on stdout.")
@click.option("--keep-source", is_flag=True, help="Leave the moved mail in the source too.")
def migrate_command(
    config_path: Path | None,
    direction: str,
    users: tuple[str, ...],
    every: bool,
    dry_run: bool,
    as_json: bool,
    keep_source: bool,
) -> None:
    """Move the mailboxes of USERS (or --all) from one store to the other, online:
    DIRECTION is maildir-to-postgresql or postgresql-to-maildir."""
    from popbox.migrate.move import MoveOptions

    if every == bool(users):
        raise click.UsageError("name the users, or give --all")
    config = load(config_path)
    names = _all_users(config) if every else list(dict.fromkeys(users))
    try:
        sides = _sides(config, direction)
    except PopboxError as exc:
        raise click.ClickException(str(exc)) from exc
    options = MoveOptions(dry_run=dry_run, keep_source=keep_source)

    async def run() -> list[UserMove]:
        try:
            return await run_moves(sides, names, options, quiet=as_json)
        finally:
            await sides.close()

    moves = asyncio.run(run())
    summary = _summary(moves, dry_run)
    if as_json:
        data = {"summary": summary, "users": [move.as_json() for move in moves]}
        click.echo(json.dumps(data, indent=2))
    else:
        failed = summary["failed"]
        click.echo(
            f"{'would move' if dry_run else 'moved'} {summary['users']} users, "
            f"{summary['folders']} folders, {summary['messages']} messages, "
            f"{summary['octets']} octets; {summary['skipped']} moved already; "
            f"{len(failed) if isinstance(failed, list) else 0} failed"
        )
    if summary["failed"]:
        sys.exit(1)
