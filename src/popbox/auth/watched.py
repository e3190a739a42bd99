"""A file's parsed contents, re-read when it changes: the passwd file and the side file
of app passwords and APOP secrets are both held this way.

Like Dovecot, the file is stat()ed at lookups: a stat costs microseconds next to a
password hash, and a user just added or a password just changed must work at once.
The common case, a file unchanged since it was loaded, is one stat() and a tuple
comparison, safe on the event loop and without the lock (the loaded version is
replaced whole). Reading and parsing is a worker thread's job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from popbox.errors import ConfigError

__all__ = ["WatchedFile"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _stat_key(info: os.stat_result) -> tuple[int, ...]:
    # ctime catches a chmod (which must re-check safety); inode catches rename-over.
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class WatchedFile(Generic[T]):
    """``contents`` is ``parse(data)`` of the file as last loaded.

    A version that cannot be read, or that ``check`` refuses (others may write it), is
    refused and logged once, and the contents before stay. A missing file is logged
    once and then either empties the contents (``keep_when_missing`` False) or keeps
    them. ``check_interval`` seconds must pass between two looks at the file.
    """

    def __init__(
        self,
        path: Path,
        parse: Callable[[bytes], T],
        empty: Callable[[], T],
        check: Callable[[os.stat_result, Path], None],
        what: str,
        *,
        keep_when_missing: bool = False,
        check_interval: float = 0.0,
    ) -> None:
        """``what`` names the contents in log lines ("users", "app passwords")."""
        self.path = Path(path)
        self._parse = parse
        self._empty = empty
        self._check = check
        self._what = what
        self._keep_when_missing = keep_when_missing
        self._check_interval = check_interval
        self._lock = threading.Lock()
        self.contents: T = empty()
        self._key: tuple[int, ...] | None = None
        # The version last refused as unsafe: refused (and logged) once, not every look.
        self._refused_key: tuple[int, ...] | None = None
        self._missing = False
        self._checked_at = -float("inf")

    def changed(self) -> bool:
        """False when the file is the version loaded (or refused, or still missing),
        or was looked at less than ``check_interval`` ago: one stat(), any thread."""
        now = time.monotonic()
        if now - self._checked_at < self._check_interval:
            return False
        try:
            key = _stat_key(os.stat(self.path))
        except FileNotFoundError:
            changed = not self._missing
        except OSError:
            return True
        else:
            changed = key not in (self._key, self._refused_key)
        if not changed:
            self._checked_at = now  # a race here only costs another stat()
        return changed

    def refresh(self, *, strict: bool = False, force: bool = False) -> bool:
        """Re-read the file if it changed (``force``: look now, whatever the interval);
        True if ``contents`` were replaced. ``strict`` (at start) raises ConfigError
        for a file that cannot be read or is refused."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked_at < self._check_interval:
                return False
            self._checked_at = now
            try:
                if not force and not self.changed_since_loaded():
                    return False
                # fstat the descriptor we read from, so the safety check and the
                # contents are of the same file even if it is renamed over meanwhile.
                with open(self.path, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    try:
                        self._check(info, self.path)
                    except ConfigError as exc:
                        if strict:
                            raise
                        log.error("%s; keeping the %s loaded before", exc, self._what)
                        self._refused_key = _stat_key(info)
                        return False
                    data = handle.read()
            except FileNotFoundError:
                return self._gone()
            except OSError as exc:
                if strict:
                    raise ConfigError(f"{self.path}: cannot read: {exc.strerror}") from exc
                log.error(
                    "%s: cannot read, keeping the %s loaded before: %s", self.path, self._what, exc
                )
                return False
            self.contents = self._parse(data)
            self._key, self._missing = _stat_key(info), False
            return True

    def changed_since_loaded(self) -> bool:
        """``changed()`` without the interval (the caller holds the lock)."""
        try:
            key = _stat_key(os.stat(self.path))
        except FileNotFoundError:
            return not self._missing
        return key not in (self._key, self._refused_key)

    def _gone(self) -> bool:
        if self._missing:
            return False
        self._missing = True
        if self._keep_when_missing:
            keeping = f"keeping the {self._what} loaded before" if self._key else f"no {self._what}"
            log.warning("%s: does not exist; %s", self.path, keeping)
            return False
        if self._key is not None:
            log.warning("%s: removed; no %s now", self.path, self._what)
        self.contents, self._key = self._empty(), None
        return True
