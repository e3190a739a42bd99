"""``popbox fetch --quarantine`` and quarantine IDs: what is set aside, and which to offer again.

The state DB says which messages are quarantined (``CollectorState.quarantined``) and
why; the quarantine folder's ``.reason`` files say since when. An ID is
``quarantine_id(uid)`` (``popbox.collector.quarantine``), unique within an account; on
the command line it may be written ``ID``, ``ACCOUNT/ID``, or a unique start of either
of at least ``MIN_ID_PREFIX`` hex digits.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Final

import click

from popbox.collector.quarantine import Quarantine, quarantine_id
from popbox.collector.state import CollectorState

__all__ = [
    "QuarantinedMessage",
    "UnknownQuarantineId",
    "list_quarantine",
    "print_quarantine",
    "resolve_ids",
]

# The shortest start of an ID accepted: long enough not to match by accident.
MIN_ID_PREFIX: Final = 6


class UnknownQuarantineId(LookupError):
    """An ID that names no quarantined message (or more than one)."""


@dataclass(frozen=True, slots=True)
class QuarantinedMessage:
    id: str
    account: str
    uidl: str
    reason: str
    size: int
    quarantined: str
    """When it was set aside (``YYYY-MM-DDTHH:MM:SSZ``), "" when its files are gone."""
    path: str
    """The raw message in the quarantine folder, "" when it is gone."""

    @property
    def qualified_id(self) -> str:
        return f"{self.account}/{self.id}"


async def list_quarantine(
    state: CollectorState, quarantine: Quarantine, accounts: Iterable[str]
) -> list[QuarantinedMessage]:
    """Every quarantined message of ``accounts``, oldest first within each account."""
    listing = []
    for account in accounts:
        found = []
        for record in await state.quarantined(account):
            note = quarantine.note(account, record.uid)
            stored = quarantine.load(account, record.uid)
            found.append(
                QuarantinedMessage(
                    id=quarantine_id(record.uid),
                    account=account,
                    uidl=record.uid,
                    reason=record.last_error or note.reason,
                    size=record.size,
                    quarantined=note.quarantined,
                    path=str(stored) if stored is not None else "",
                )
            )
        listing += sorted(found, key=lambda m: (m.quarantined, m.uidl))
    return listing


def resolve_ids(
    wanted: Sequence[str], listing: Sequence[QuarantinedMessage]
) -> dict[str, set[str]]:
    """account -> the UIDLs the IDs in ``wanted`` name; UnknownQuarantineId otherwise."""
    chosen: dict[str, set[str]] = {}
    for text in wanted:
        account, _, short = text.rpartition("/")
        short = short.lower()
        matches = [
            message
            for message in listing
            if (not account or message.account == account)
            and len(short) >= MIN_ID_PREFIX
            and message.id.startswith(short)
        ]
        if not matches:
            raise UnknownQuarantineId(f"no quarantined message has the ID {text!r}")
        if len(matches) > 1:
            names = ", ".join(m.qualified_id for m in matches)
            raise UnknownQuarantineId(f"the ID {text!r} names several messages: {names}")
        chosen.setdefault(matches[0].account, set()).add(matches[0].uidl)
    return chosen


def print_quarantine(listing: Sequence[QuarantinedMessage], *, as_json: bool) -> None:
    """A table on a terminal, tab-separated lines otherwise, or JSON."""
    if as_json:
        click.echo(json.dumps([asdict(m) for m in listing], indent=2))
        return
    if not sys.stdout.isatty():
        for m in listing:
            fields = (m.id, m.account, m.uidl, _one_line(m.reason), str(m.size), m.quarantined)
            click.echo("\t".join(fields))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"popbox fetch quarantine ({len(listing)})")
    for column in ("ID", "account", "UIDL", "reason", "size", "quarantined"):
        table.add_column(column, overflow="fold")
    for m in listing:
        table.add_row(m.id, m.account, m.uidl, m.reason, str(m.size), m.quarantined or "-")
    Console().print(table)


def _one_line(text: str) -> str:
    return " ".join(text.split())
