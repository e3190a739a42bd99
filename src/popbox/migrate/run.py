"""One user's import from a Maildir source: plan every folder, write the mapping, apply.

``plan_maildir`` reads the source (Dovecot, Courier or X-UIDL) and decides every
message of every folder; ``apply_plan`` carries it out in place or by copy
(popbox.migrate.apply). ``describe`` and ``as_json`` report per user: what each
message became, and every problem met, with the decision taken.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popbox.migrate.apply import (
    FolderResult,
    adopt_folder,
    copy_folder,
    existing_uidls,
    write_mapping,
)
from popbox.migrate.courier import courier_sources
from popbox.migrate.dovecot import dovecot_sources
from popbox.migrate.maildirs import list_folders
from popbox.migrate.plan import Decision, FolderPlan, UserPlan, plan_folder
from popbox.migrate.template import UidlTemplate
from popbox.migrate.xuidl import xuidl_sources

if TYPE_CHECKING:
    from popbox.store.maildir import MaildirStore

__all__ = ["ImportOutcome", "SourceKind", "apply_plan", "as_json", "describe", "plan_maildir"]


class SourceKind(enum.Enum):
    DOVECOT = "dovecot"
    COURIER = "courier"
    XUIDL = "x-uidl"
    POP3 = "pop3"


def plan_maildir(
    kind: SourceKind,
    user: str,
    maildir: Path,
    *,
    copy: bool,
    template: UidlTemplate | None = None,
    reuse_xuidl: bool = False,
) -> UserPlan:
    """Plan the import of every folder of the Maildir++ tree at ``maildir``."""
    plan = UserPlan(user, f"{kind.value} {maildir}")
    if not (maildir / "cur").is_dir():
        plan.refusal = f"{maildir} is not a Maildir (no cur/)"
        return plan
    folders, tree_problems = list_folders(maildir)
    plan.problems.extend(tree_problems)
    for folder, directory in folders.items():
        unreadable: str | None = None
        if kind is SourceKind.DOVECOT:
            assert template is not None
            found = dovecot_sources(directory, template, reuse_xuidl=reuse_xuidl)
            sources, missing, problems = found.sources, found.missing, found.problems
            unreadable = found.unreadable
        elif kind is SourceKind.COURIER:
            courier = courier_sources(directory)
            sources, missing, problems = courier.sources, courier.missing, courier.problems
            unreadable = courier.unreadable
        else:
            headers = xuidl_sources(directory)
            sources, missing, problems = headers.sources, [], headers.problems
        if unreadable is not None:
            # The old UIDLs are there but unknown: importing would give every message
            # a new one (and a copy, run again once the list is readable, would store
            # each message twice), so nothing of this user is imported.
            plan.refusal = f"{unreadable}; nothing imported: make it readable and run again"
            return plan
        plan.folders.append(
            plan_folder(folder, sources, copy=copy, missing=missing, problems=problems)
        )
    return plan


@dataclass(slots=True)
class ImportOutcome:
    plan: UserPlan
    results: list[FolderResult] = field(default_factory=list)
    mapping: Path | None = None
    error: str | None = None


async def apply_plan(
    store: MaildirStore, plan: UserPlan, *, copy: bool, mapping_dir: Path
) -> ImportOutcome:
    """Write the mapping, then apply each folder (see popbox.migrate.apply)."""
    outcome = ImportOutcome(plan)
    outcome.mapping = write_mapping(plan, mapping_dir)
    for folder in plan.folders:
        if copy:
            present = await existing_uidls(store, plan.user, folder.folder)
            outcome.results.append(await copy_folder(store, plan.user, folder, present))
        else:
            outcome.results.append(await adopt_folder(store, plan.user, folder))
    return outcome


def _folder_counts(folder: FolderPlan) -> dict[str, int]:
    return {decision.value: folder.count(decision) for decision in Decision}


def describe(outcome: ImportOutcome, *, dry_run: bool, verbose: bool = False) -> list[str]:
    """Human lines: per folder the counts, then each problem and rewritten message."""
    plan = outcome.plan
    lines = [f"{plan.user}: from {plan.source}{' (dry run: nothing written)' if dry_run else ''}"]
    lines.extend(f"  problem: {problem}" for problem in plan.problems)
    if plan.refusal is not None:
        lines.append(f"  refused: {plan.refusal}")
    results = {result.folder: result for result in outcome.results}
    for folder in plan.folders:
        counts = ", ".join(f"{count} {name}" for name, count in _folder_counts(folder).items())
        line = f"  {folder.folder}: {len(folder.messages)} messages: {counts}"
        result = results.get(folder.folder)
        if result is not None:
            line += f"; this run stored {result.stored}, {result.already} were already there"
        lines.append(line)
        lines.extend(f"    problem: {problem}" for problem in folder.problems)
        if result is not None:
            lines.extend(f"    store: {detail}" for detail in result.details)
        for message in folder.messages:
            if message.decision in (Decision.REWRITE, Decision.SKIP) or (
                verbose and message.decision is Decision.NEW
            ):
                old = message.source.old_uidl
                lines.append(
                    f"    {message.decision.value}: {message.source.key}"
                    f"{f' {old!r}' if old is not None else ''}"
                    f"{f' -> {message.uidl}' if message.uidl else ''}: {message.reason}"
                )
    if outcome.mapping is not None:
        lines.append(f"  rewritten UIDLs listed in {outcome.mapping}")
    if outcome.error is not None:
        lines.append(f"  failed: {outcome.error}")
    return lines


def as_json(outcome: ImportOutcome, *, dry_run: bool) -> dict[str, Any]:
    plan = outcome.plan
    results = {result.folder: result for result in outcome.results}
    return {
        "user": plan.user,
        "source": plan.source,
        "dry_run": dry_run,
        "problems": plan.problems,
        "refusal": plan.refusal,
        "mapping": str(outcome.mapping) if outcome.mapping else None,
        "error": outcome.error,
        "folders": [
            {
                "folder": folder.folder,
                "counts": _folder_counts(folder),
                "stored": results[folder.folder].stored if folder.folder in results else 0,
                "already": results[folder.folder].already if folder.folder in results else 0,
                "store": results[folder.folder].details if folder.folder in results else [],
                "problems": folder.problems,
                "messages": [
                    {
                        "key": message.source.key,
                        "old_uidl": message.source.old_uidl,
                        "uidl": message.uidl,
                        "decision": message.decision.value,
                        "reason": message.reason,
                    }
                    for message in folder.messages
                ],
            }
            for folder in plan.folders
        ],
    }
