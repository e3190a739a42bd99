"""What a snapshot holds: its roots, every file with its size and SHA-256, and a summary.

A snapshot directory is ``files/`` (one entry per root: a directory tree or a single
file) and ``manifest.json``, written last. The manifest is the only thing restore
trusts: every file it lists is checked for size and digest before anything is
written, and nothing outside it is restored.

Roots name the places popbox keeps state, so a snapshot restores onto another
machine whose configuration puts them elsewhere: ``data`` (the data directory, less
the other roots inside it), ``mail`` (``storage.maildir_root``), ``archive``
(``config.archive_path()``), ``passwd``, ``app-passwords``, ``tls-cert`` and
``tls-key``.

Paths in the manifest are POSIX paths relative to ``files/``; names that are not
UTF-8 survive through surrogateescape (JSON escapes the lone surrogates).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from popbox.errors import PopboxError

__all__ = [
    "FILES_DIR",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "BackupError",
    "FileEntry",
    "FileKind",
    "FolderSummary",
    "Manifest",
    "RootEntry",
    "file_digest",
    "read_manifest",
    "verify_snapshot",
    "write_manifest",
]

MANIFEST_NAME: Final = "manifest.json"
FILES_DIR: Final = "files"
# Bumped when the layout changes; a restore refuses a format it does not know.
MANIFEST_FORMAT: Final = 1
# Files are read in pieces of this size while hashed: memory stays bounded whatever
# the file, and 1 MiB is past where larger reads stop paying.
READ_CHUNK: Final = 1024 * 1024
# A manifest of a million files is some hundreds of MB of JSON; past this it is not ours.
MAX_MANIFEST_BYTES: Final = 2 * 1024 * 1024 * 1024

FileKind = Literal["file", "message", "object", "sqlite", "maildir-meta"]
"""``message``: a Maildir message file; ``object``: an archive object (both
immutable, so linked between snapshots); ``sqlite``: a database taken through the
online backup API; ``maildir-meta``: a folder's index, device state, UIDL list or
lock note, taken under the folder's lock; ``file``: anything else."""


class BackupError(PopboxError):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a snapshot."""

    path: str
    size: int
    sha256: str
    mtime_ns: int
    kind: FileKind


@dataclass(frozen=True, slots=True)
class RootEntry:
    """One place popbox keeps state, as it was on the machine backed up."""

    name: str
    kind: Literal["dir", "file"]
    source: str


@dataclass(slots=True)
class FolderSummary:
    """One Maildir folder as the snapshot has it."""

    messages: int = 0
    octets: int = 0
    """File sizes of its messages (as stored, not wire sizes)."""


@dataclass(slots=True)
class Manifest:
    """The manifest of one snapshot (see the module docstring)."""

    created: str
    roots: list[RootEntry] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    """Every directory, parents first, so that empty ones (tmp/) come back too."""
    users: list[str] = field(default_factory=list)
    """The users of the passwd file."""
    mailboxes: dict[str, dict[str, FolderSummary]] = field(default_factory=dict)
    """user -> folder -> what the snapshot holds of it."""
    not_included: list[str] = field(default_factory=list)
    """What popbox keeps that this snapshot does not hold, and where it is backed up."""
    format: int = MANIFEST_FORMAT

    def messages_of(self, user: str) -> int:
        return sum(folder.messages for folder in self.mailboxes.get(user, {}).values())

    def root(self, name: str) -> RootEntry | None:
        return next((root for root in self.roots if root.name == name), None)

    def to_json(self) -> bytes:
        data = asdict(self)
        return json.dumps(data, indent=1, sort_keys=True).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        raw: Any = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            raise BackupError(f"not a popbox snapshot manifest of format {MANIFEST_FORMAT}")
        try:
            return cls(
                created=str(raw["created"]),
                roots=[RootEntry(**item) for item in raw["roots"]],
                files=[FileEntry(**item) for item in raw["files"]],
                dirs=[str(item) for item in raw["dirs"]],
                users=[str(item) for item in raw["users"]],
                mailboxes={
                    user: {name: FolderSummary(**summary) for name, summary in folders.items()}
                    for user, folders in raw["mailboxes"].items()
                },
                not_included=[str(item) for item in raw["not_included"]],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise BackupError(f"damaged manifest: {exc!r}") from exc


def check_relative(path: str) -> None:
    """Refuse a manifest path that could name anything outside ``files/``."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise BackupError(f"manifest names {path!r}, which is not a path inside the snapshot")


def write_manifest(snapshot: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` durably (the snapshot is not complete without it)."""
    path = snapshot / MANIFEST_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(manifest.to_json())
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(snapshot: Path) -> Manifest:
    """The manifest of the snapshot at ``snapshot``; BackupError if there is none."""
    path = snapshot / MANIFEST_NAME
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise BackupError(f"{snapshot}: no {MANIFEST_NAME}: not a complete snapshot") from None
    except OSError as exc:
        raise BackupError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise BackupError(f"{path}: larger than any manifest popbox writes")
    try:
        manifest = Manifest.from_json(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupError(f"{path}: not valid JSON: {exc}") from exc
    for entry in manifest.files:
        check_relative(entry.path)
    for directory in manifest.dirs:
        check_relative(directory)
    return manifest


def file_digest(fd: int) -> tuple[int, str]:
    """(size, SHA-256 hex) of what is left to read from ``fd``."""
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, READ_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _problems(snapshot: Path, manifest: Manifest) -> Iterator[str]:
    files = snapshot / FILES_DIR
    for entry in manifest.files:
        try:
            fd = os.open(files / entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            yield f"{entry.path}: {exc.strerror}"
            continue
        try:
            size, sha256 = file_digest(fd)
        finally:
            os.close(fd)
        if size != entry.size:
            yield f"{entry.path}: {size} octets, the manifest says {entry.size}"
        elif sha256 != entry.sha256:
            yield f"{entry.path}: its SHA-256 is not the manifest's"


def verify_snapshot(snapshot: Path) -> Manifest:
    """Read the manifest and check every file it lists; BackupError naming what is
    missing or changed (the first few) if anything is."""
    manifest = read_manifest(snapshot)
    problems = list(_problems(snapshot, manifest))
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BackupError(f"{snapshot} does not match its manifest: {shown}{more}")
    return manifest
