"""TokenFile: where a login's refresh token (or msal's token cache) is kept, owner-only.

The file holds a long-lived credential, so it is 0600 from its first byte and is
replaced atomically: a crash leaves the old login or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from popbox.errors import CollectorError
from popbox.fileio import fsync_dir

__all__ = ["TokenFile"]


class TokenFile:
    """A JSON document readable only by its owner: the refresh token or msal's cache."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CollectorError(f"cannot read token store {self.path}: {exc}") from exc
        if not isinstance(data, dict):
            raise CollectorError(f"token store {self.path} is not a JSON object")
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Replace the file atomically; it is 0600 from its first byte."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        fsync_dir(self.path.parent)  # the rename itself must survive a crash
