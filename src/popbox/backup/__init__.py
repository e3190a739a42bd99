"""Backup and restore of popbox's local state: consistent snapshots taken while the
server runs, incremental by hard links, restored onto another machine as they were."""

from popbox.backup.manifest import BackupError, Manifest
from popbox.backup.restore import RestoreResult, find_snapshot, restore_snapshot
from popbox.backup.snapshot import SnapshotResult, complete_snapshots, take_snapshot

__all__ = [
    "BackupError",
    "Manifest",
    "RestoreResult",
    "SnapshotResult",
    "complete_snapshots",
    "find_snapshot",
    "restore_snapshot",
    "take_snapshot",
]
