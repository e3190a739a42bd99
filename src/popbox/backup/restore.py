"""``popbox restore SRC``: a snapshot brought back into the configured places.

Restore checks the whole snapshot against its manifest (every file's size and
SHA-256) before it writes anything, and refuses a target that already holds
something unless told ``--force`` (which replaces each target root whole: the
restored Maildirs must not gain files the snapshot never had). Each root of the
snapshot goes where the configuration of this machine keeps that root
(backup.roots), so the data directory may move.

Files come back byte for byte with their modification times, private (0600, dirs
0700) as popbox makes them, and owned by ``config.user`` when restore runs as root.
Every folder's index, device state, kept UIDLs and lock note come back with the
messages they describe, so every UIDL stays what it was, every device sees what it
saw, and the archive's database and objects are searchable as they were. Run it
while popbox is stopped: a server would take the Maildirs half restored.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from popbox.backup.manifest import (
    FILES_DIR,
    MANIFEST_NAME,
    READ_CHUNK,
    BackupError,
    Manifest,
    verify_snapshot,
)
from popbox.backup.roots import Root, roots_of
from popbox.backup.snapshot import complete_snapshots
from popbox.backup.writer import DIR_MODE, FILE_MODE, WRITE_FLAGS
from popbox.config import Config
from popbox.errors import PopboxError

__all__ = ["RestoreResult", "find_snapshot", "restore_snapshot"]

# What the operator is told when the target holds something.
NOT_EMPTY: Final = (
    "{path} is not empty ({what}); restore into an empty place, or give --force "
    "to replace it with the snapshot"
)

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class RestoreResult:
    snapshot: Path
    manifest: Manifest
    files: int
    octets: int


def find_snapshot(source: Path) -> Path:
    """``source`` itself if it is a snapshot, else the newest complete one in it."""
    if (source / MANIFEST_NAME).is_file():
        return source
    found = complete_snapshots(source)
    if not found:
        raise BackupError(f"{source} is neither a snapshot nor a directory of snapshots")
    return found[-1]


def restore_snapshot(
    config: Config, source: Path, *, force: bool = False, progress: Progress | None = None
) -> RestoreResult:
    """Restore the snapshot at (or newest in) ``source`` into ``config``'s places."""
    say = progress if progress is not None else (lambda line: None)
    try:
        snapshot = find_snapshot(source.absolute())
        say(f"checking {snapshot} against its manifest")
        manifest = verify_snapshot(snapshot)
        targets = _targets(config, manifest)
        if force:
            for root in targets.values():
                _remove(root)
        else:
            for root in targets.values():
                _check_empty(root)
        return _write(config, snapshot, manifest, targets)
    except PopboxError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise BackupError(f"restore from {source} failed: {exc.strerror}{where}") from exc


def _targets(config: Config, manifest: Manifest) -> dict[str, Root]:
    """Where each root of the snapshot goes under ``config``."""
    roots, _ = roots_of(config)
    by_name = {root.name: root for root in roots}
    targets: dict[str, Root] = {}
    for entry in manifest.roots:
        root = by_name.get(entry.name)
        if root is None or root.kind != entry.kind:
            raise BackupError(
                f"the snapshot holds {entry.name} ({entry.source}), which this "
                "configuration does not keep in files (see its storage, auth and "
                "archive backends)"
            )
        targets[entry.name] = root
    _check_paths(manifest, targets)
    return targets


def _check_paths(manifest: Manifest, targets: dict[str, Root]) -> None:
    """Refuse a manifest whose files or directories do not fit its roots: a file root
    is one file of that name, a directory root holds paths under its name."""
    for path in manifest.dirs:
        root = targets.get(path.partition("/")[0])
        if root is None or root.kind != "dir":
            raise BackupError(f"manifest names the directory {path!r} outside its roots")
    for entry in manifest.files:
        name, slash, _ = entry.path.partition("/")
        root = targets.get(name)
        if root is None or (root.kind == "dir") != bool(slash):
            raise BackupError(f"manifest names the file {entry.path!r} outside its roots")


def _check_empty(root: Root) -> None:
    path = root.path
    if root.kind == "file":
        if path.is_file() and path.stat().st_size > 0:
            raise BackupError(NOT_EMPTY.format(path=path, what="a file with content"))
        return
    if not path.exists():
        return
    # A data directory a first `popbox serve` prepared (empty passwd, empty Maildir
    # root) holds nothing to lose; any file with content is something.
    for directory, _, files in os.walk(path):
        for name in files:
            file = Path(directory) / name
            if file.is_symlink() or file.stat().st_size > 0:
                raise BackupError(NOT_EMPTY.format(path=path, what=f"for one, {file}"))


def _remove(root: Root) -> None:
    if root.kind == "dir" and root.path.is_dir() and not root.path.is_symlink():
        shutil.rmtree(root.path)
    elif root.path.exists() or root.path.is_symlink():
        root.path.unlink()


def _place(targets: dict[str, Root], path: str) -> Path:
    name, _, rest = path.partition("/")
    root = targets[name]
    return root.path / rest if rest else root.path


def _write(
    config: Config, snapshot: Path, manifest: Manifest, targets: dict[str, Root]
) -> RestoreResult:
    owner = _owner(config)
    made: list[Path] = []
    for root in targets.values():
        parent = root.path if root.kind == "dir" else root.path.parent
        made.extend(_makedirs(parent))
    for directory in manifest.dirs:
        place = _place(targets, directory)
        if not place.is_dir():
            os.mkdir(place, DIR_MODE)
        os.chmod(place, DIR_MODE)  # one a first `popbox serve` made, or the umask's
        made.append(place)
    octets = 0
    files = snapshot / FILES_DIR
    for entry in manifest.files:
        place = _place(targets, entry.path)
        made.extend(_makedirs(place.parent))
        if place.is_file():
            place.unlink()  # empty (checked), as a first `popbox serve` leaves passwd
        size, sha256 = _copy(files / entry.path, place)
        if size != entry.size or sha256 != entry.sha256:
            place.unlink()
            raise BackupError(f"{entry.path} changed while it was restored")
        os.utime(place, ns=(entry.mtime_ns, entry.mtime_ns))
        made.append(place)
        octets += size
    if owner is not None:
        for path in made:
            os.chown(path, *owner, follow_symlinks=False)
    # One flush of everything restored before it is reported done, rather than a
    # disk flush per file.
    os.sync()
    return RestoreResult(snapshot, manifest, len(manifest.files), octets)


def _makedirs(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents private; the ones made, parents first."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        os.mkdir(directory, DIR_MODE)
    return list(reversed(missing))


def _copy(source: Path, target: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        out = os.open(target, WRITE_FLAGS | os.O_NOFOLLOW, FILE_MODE)
        try:
            while chunk := os.read(fd, READ_CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
                size += len(chunk)
            os.fchmod(out, FILE_MODE)  # whatever the umask says
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def _owner(config: Config) -> tuple[int, int] | None:
    """The uid and gid the server runs as after dropping root, if restore runs as root."""
    if os.geteuid() != 0 or config.user is None:
        return None
    try:
        user = pwd.getpwnam(config.user)
        gid = grp.getgrnam(config.group).gr_gid if config.group else user.pw_gid
    except KeyError as exc:
        raise BackupError(f"user/group of the configuration: {exc}") from exc
    return user.pw_uid, gid
