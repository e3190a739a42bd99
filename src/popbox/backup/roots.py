"""Where popbox keeps its state under a configuration: the roots a snapshot is made of.

Backup and restore both ask this module, each with its own configuration, so a
snapshot taken where the Maildirs are ``/var/vmail`` restores onto a machine whose
Maildirs are ``popbox-data/mail``: a root is matched by name, not by path.

What lives in PostgreSQL (mail, users or the archive, by configuration) is not a file
here: it is listed as not included, with the tool that backs it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from popbox.backup.manifest import BackupError
from popbox.config import Config

__all__ = ["PG_DUMP_NOTE", "Root", "nested_in", "roots_of"]

# What the operator is told for data popbox leaves to PostgreSQL's own tools.
PG_DUMP_NOTE: Final = (
    '{what} is in PostgreSQL ({key} = "postgresql"): popbox backup does not copy it; '
    "back the database up with PostgreSQL's own tools (pg_dump, or pg_basebackup "
    "with WAL archiving)"
)


@dataclass(frozen=True, slots=True)
class Root:
    """One place popbox keeps state: a directory tree or a single file."""

    name: str
    kind: Literal["dir", "file"]
    path: Path


def roots_of(config: Config) -> tuple[list[Root], list[str]]:
    """The roots of ``config`` (the data directory first) and what is not in them.

    Raises BackupError for a layout a snapshot cannot follow: Maildirs placed by a
    ``mail_location`` template rather than under ``maildir_root``.
    """
    roots = [Root("data", "dir", config.data_dir)]
    notes: list[str] = []
    if config.storage.backend == "maildir" or config.storage.moving_from == "maildir":
        if config.storage.mail_location:
            raise BackupError(
                "storage.mail_location places each Maildir by a template; popbox backup "
                "only follows Maildirs under storage.maildir_root (back them up with "
                "their filesystem's snapshots)"
            )
        roots.append(Root("mail", "dir", config.storage.maildir_root))
    if "postgresql" in (config.storage.backend, config.storage.moving_from):
        notes.append(PG_DUMP_NOTE.format(what="the mail", key="storage.backend"))
    if config.archive_backend() == "sqlite":
        roots.append(Root("archive", "dir", config.archive_path()))
    else:
        notes.append(PG_DUMP_NOTE.format(what="the archive", key="archive.backend"))
    if config.auth.backend == "passwd-file":
        roots.append(Root("passwd", "file", config.auth.passwd_file))
        roots.append(Root("app-passwords", "file", config.auth.credentials_path()))
    else:
        notes.append(PG_DUMP_NOTE.format(what="the user database", key="auth.backend"))
    roots.append(Root("tls-cert", "file", config.tls_cert_path()))
    roots.append(Root("tls-key", "file", config.tls_key_path()))
    return [_absolute(root) for root in roots], notes


def _absolute(root: Root) -> Root:
    return Root(root.name, root.kind, Path(root.path).absolute())


def nested_in(root: Root, roots: list[Root]) -> set[Path]:
    """The paths of the other roots that lie inside ``root``: each is taken as its own
    root, so the walk of ``root`` leaves them out."""
    inside: set[Path] = set()
    for other in roots:
        if other.name != root.name and other.path.is_relative_to(root.path):
            if other.path == root.path:
                raise BackupError(f"{root.name} and {other.name} are the same path {root.path}")
            inside.add(other.path)
    return inside
