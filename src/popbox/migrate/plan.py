"""What an import will do with each message, decided in full before anything is written.

A source (a Dovecot or Courier Maildir, X-UIDL headers, a live POP3 server) lists its
messages in the old server's order with the UIDL that server showed for each, or
None when no client can have seen one. ``plan_folder`` turns that list into one
decision per message:

- kept: the old UIDL is valid (1-70 characters 0x21-0x7E, RFC 1939 section 7) and
  unique in the folder, so popbox serves it unchanged and clients download nothing;
- rewritten: the old UIDL is invalid or repeats an earlier one. A repeat becomes
  ``UIDL-2``, ``UIDL-3`` ... (what Dovecot's ``pop3_uidl_duplicates = rename``
  serves); an invalid one becomes ``x`` and the SHA-1 of it, in hex. Either way the
  new UIDL depends only on the old listing, so an import run twice plans the same,
  and the pair goes into the mapping file. Clients fetch such a message once more;
- new: the old server never showed this message a UIDL. Adopted in place, popbox
  gives it one of its own; copied, it gets ``n`` and the SHA-1 of its source key, so
  that a resumed copy recognises it;
- skipped: the source names a message that is not there (a uidlist line whose file is
  gone), reported and left out.

Nothing here touches a file; ``popbox.migrate.apply`` carries a plan out.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "MAX_UIDL",
    "Decision",
    "FolderPlan",
    "PlannedMessage",
    "SourceMessage",
    "UserPlan",
    "plan_folder",
    "uidl_problem",
]

# RFC 1939 section 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UIDL: Final = 70


def uidl_problem(uidl: str) -> str | None:
    """Why ``uidl`` cannot be served as a POP3 unique-id, or None if it can."""
    if not uidl:
        return "empty"
    if len(uidl) > MAX_UIDL:
        return f"{len(uidl)} characters, more than RFC 1939's {MAX_UIDL}"
    bad = next((char for char in uidl if not "\x21" <= char <= "\x7e"), None)
    if bad is not None:
        return f"character {bad!r}, outside RFC 1939's 0x21-0x7E"
    return None


class Decision(enum.Enum):
    KEEP = "kept"
    REWRITE = "rewritten"
    NEW = "new"
    SKIP = "skipped"


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """One message as the old server listed it."""

    key: str
    """The Maildir key (file name up to ':'), or the message number of a live import."""
    path: Path | None
    """The message file, for Maildir sources (None: fetched live, or missing)."""
    old_uidl: str | None
    """The UIDL the old server showed; None if it never showed one."""
    origin: str = ""
    """Where ``old_uidl`` came from: "P field", "pop3_uidl_format", "X-UIDL", ..."""
    size: int | None = None


@dataclass(frozen=True, slots=True)
class PlannedMessage:
    source: SourceMessage
    decision: Decision
    uidl: str | None
    """What popbox will serve; None for a NEW message adopted in place (popbox's own)."""
    reason: str = ""


@dataclass(slots=True)
class FolderPlan:
    """One folder's messages, in the old server's order, and what happens to each."""

    folder: str
    messages: list[PlannedMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """What was wrong with the source beyond single messages (a corrupt header, ...)."""

    def count(self, decision: Decision) -> int:
        return sum(1 for message in self.messages if message.decision is decision)

    @property
    def rewritten(self) -> list[PlannedMessage]:
        return [m for m in self.messages if m.decision is Decision.REWRITE]


@dataclass(slots=True)
class UserPlan:
    user: str
    source: str
    folders: list[FolderPlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refusal: str | None = None
    """Why nothing of this user may be imported (a source that is not a Maildir, an
    old list that is there but cannot be read); None when the plan can be applied."""


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape"), usedforsecurity=False).hexdigest()


def invalid_replacement(uidl: str) -> str:
    """The stable UIDL an invalid one is rewritten to (41 characters)."""
    return "x" + _sha1(uidl)


def new_uidl(key: str) -> str:
    """The stable UIDL a copied message without an old one gets (41 characters)."""
    return "n" + _sha1(key)


def plan_folder(
    folder: str,
    sources: Iterable[SourceMessage],
    *,
    copy: bool,
    missing: Sequence[SourceMessage] = (),
    problems: Sequence[str] = (),
) -> FolderPlan:
    """Decide every message of one folder (see the module docstring).

    ``missing``: messages the source lists whose file is gone (skipped).
    """
    plan = FolderPlan(folder, problems=list(problems))
    listed = list(sources)
    # Every valid UIDL keeps its first message; rewrites may take none of them, so a
    # renamed repeat never steals the UIDL a later message really had.
    taken: dict[str, int] = {}  # a served or reserved UIDL -> repeats of it so far
    keeps: set[int] = set()
    for index, source in enumerate(listed):
        old = source.old_uidl
        if old is not None and uidl_problem(old) is None and old not in taken:
            taken[old] = 1
            keeps.add(index)
    for index, source in enumerate(listed):
        old = source.old_uidl
        if old is None:
            plan.messages.append(PlannedMessage(source, Decision.NEW, None))
        elif index in keeps:
            plan.messages.append(PlannedMessage(source, Decision.KEEP, old, source.origin))
        elif (problem := uidl_problem(old)) is not None:
            uidl = _unique(invalid_replacement(old), taken)
            plan.messages.append(
                PlannedMessage(source, Decision.REWRITE, uidl, f"invalid UIDL: {problem}")
            )
        else:
            uidl = _renamed(old, taken)
            plan.messages.append(
                PlannedMessage(source, Decision.REWRITE, uidl, "repeats an earlier message's UIDL")
            )
    # NEW messages get their UIDLs last, so none can take one an old UIDL needs.
    for index, planned in enumerate(plan.messages):
        if planned.decision is not Decision.NEW:
            continue
        if copy:
            made: str | None = _unique(new_uidl(planned.source.key), taken)
            reason = "no UIDL on the old server; a stable one made from its key"
        else:
            made, reason = None, "no UIDL on the old server; popbox gives it one"
        plan.messages[index] = PlannedMessage(planned.source, Decision.NEW, made, reason)
    for source in missing:
        plan.messages.append(
            PlannedMessage(source, Decision.SKIP, None, "listed by the old server, file gone")
        )
    return plan


def _renamed(uidl: str, taken: dict[str, int]) -> str:
    """Dovecot's rename of a repeated UIDL: ``-2``, ``-3`` ... (hashed if too long)."""
    counter = taken[uidl]
    while True:
        counter += 1
        candidate = f"{uidl}-{counter}"
        if len(candidate) > MAX_UIDL:
            candidate = _unique(invalid_replacement(candidate), taken)
        if candidate not in taken:
            taken[uidl] = counter
            taken[candidate] = 1
            return candidate


def _unique(candidate: str, taken: dict[str, int]) -> str:
    base, counter = candidate, 1
    while candidate in taken:
        counter += 1
        candidate = f"{base}-{counter}"
    taken[candidate] = 1
    return candidate
