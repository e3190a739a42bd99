"""Quarantine: poison messages are set aside, raw, with the reason, so later ones flow.

A message lands here when a sink refused it for good, when it kept failing past the
account's retry budget, or when it is over the size limit and the policy says so.
Each is stored as ``QUARANTINE/ACCOUNT/NAME.eml`` (the bytes as the server sent them)
beside ``NAME.reason`` (what went wrong, when, the UIDL and the content hash), so an
operator can read, fix and re-offer it with ``popbox fetch --retry-quarantined``.

A quarantined message's ID (``popbox fetch --quarantine`` lists them) is the start of
NAME's hash part: it follows from the UIDL alone, so it stays the same across runs
and re-quarantines.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.errors import CollectorError
from popbox.fileio import fsync_dir

__all__ = ["ID_CHARS", "Quarantine", "QuarantineNote", "quarantine_id"]

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")
# Keep file names short and readable: a UIDL may be 70 characters of anything.
NAME_UIDL_CHARS: Final = 40
# Hex digits of a quarantine ID: short enough to type, 48 bits keep an account's
# quarantine free of collisions.
ID_CHARS: Final = 12
# Hex digits of the UIDL's hash in a file name.
NAME_HASH_CHARS: Final = 16


def _uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()[:NAME_HASH_CHARS]


def quarantine_id(uid: str) -> str:
    """The short, stable ID of a quarantined message (within its account)."""
    return _uid_hash(uid)[:ID_CHARS]


@dataclass(frozen=True, slots=True)
class QuarantineNote:
    """What a ``.reason`` file says (empty fields where it is missing or unreadable)."""

    reason: str = ""
    quarantined: str = ""
    """When, as written: ``YYYY-MM-DDTHH:MM:SSZ``."""


def _with(base: Path, suffix: str) -> Path:
    # Not Path.with_suffix: a UIDL-derived name may contain dots of its own.
    return base.parent / (base.name + suffix)


class Quarantine:
    """The quarantine folder (one subfolder per account)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _base(self, account: str, uid: str) -> Path:
        digest = _uid_hash(uid)
        readable = _UNSAFE.sub("_", uid)[:NAME_UIDL_CHARS]
        return self.root / account / f"{digest}-{readable}"

    def message_path(self, account: str, uid: str) -> Path:
        return _with(self._base(account, uid), ".eml")

    def save(
        self, *, account: str, uid: str, source: Path, sha256: str, size: int, reason: str
    ) -> Path:
        """Copy the spooled message here durably with its reason; return its path."""
        base = self._base(account, uid)
        target = _with(base, ".eml")
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            tmp = _with(base, ".tmp")
            with source.open("rb") as reader, tmp.open("wb") as writer:
                shutil.copyfileobj(reader, writer)
                writer.flush()
                os.fsync(writer.fileno())
            os.replace(tmp, target)
            note = (
                f"reason: {reason}\naccount: {account}\nuidl: {uid}\nsha256: {sha256}\n"
                f"size: {size}\nquarantined: "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            )
            reason_tmp = _with(base, ".reason.tmp")
            with reason_tmp.open("w", encoding="utf-8") as writer:
                writer.write(note)
                writer.flush()
                os.fsync(writer.fileno())
            os.replace(reason_tmp, _with(base, ".reason"))
            fsync_dir(base.parent)
        except OSError as exc:
            raise CollectorError(f"quarantine {base.parent}: {exc}") from exc
        return target

    def load(self, account: str, uid: str) -> Path | None:
        path = self.message_path(account, uid)
        return path if path.exists() else None

    def note(self, account: str, uid: str) -> QuarantineNote:
        """The reason file's reason and time, for listings."""
        try:
            text = _with(self._base(account, uid), ".reason").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return QuarantineNote()
        fields = dict(line.partition(": ")[::2] for line in text.splitlines() if ": " in line)
        return QuarantineNote(fields.get("reason", ""), fields.get("quarantined", ""))

    def remove(self, account: str, uid: str) -> None:
        base = self._base(account, uid)
        for suffix in (".eml", ".reason"):
            _with(base, suffix).unlink(missing_ok=True)
