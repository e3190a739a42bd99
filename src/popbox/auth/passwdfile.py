"""Users from a Dovecot-format passwd file, reloaded when the file changes.

One user per line, ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields``
(auth.entries reads a line's columns, the same way for the PostgreSQL user table);
``#`` comments and blank lines are ignored. App passwords and APOP secrets come from
a side file (auth.credentials).

Usernames are case-sensitive, as in Dovecot's passwd-file by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Final

from popbox.auth.base import SCRAM_HASHES, ScramCredentials, UserRecord
from popbox.auth.checks import (
    Imitator,
    apop_secret_for,
    check_password,
    scram_credentials_for,
)
from popbox.auth.credentials import AppPassword, CredentialFile, app_password_key
from popbox.auth.entries import (
    NOPASSWORD,
    PASSWD_FIELDS,
    QUOTA_RULE_KEY,
    PasswdEntry,
    mail_fields,
    parse_extra_fields,
    parse_line,
    parse_size,
    quota_from_fields,
    why_not,
)
from popbox.auth.hasher import Hasher, shared_hasher
from popbox.auth.names import is_valid_username
from popbox.auth.schemes import DEFAULT_SCHEME
from popbox.auth.watched import WatchedFile
from popbox.errors import ConfigError

__all__ = [
    "NOPASSWORD",
    "PASSWD_FIELDS",
    "QUOTA_RULE_KEY",
    "RELOAD_CHECK_INTERVAL",
    "PasswdEntry",
    "PasswdFilePassDB",
    "check_file_safety",
    "mail_fields",
    "parse_extra_fields",
    "parse_line",
    "parse_passwd",
    "parse_size",
    "quota_from_fields",
]

log = logging.getLogger(__name__)

# Like Dovecot, stat the passwd file on every lookup: a stat costs microseconds next
# to a password hash, and a user just added or a password just changed must work at
# once (a script that adds a user and logs in straight away is common).
RELOAD_CHECK_INTERVAL: Final = 0.0


def parse_passwd(data: bytes, *, source: str) -> dict[str, PasswdEntry]:
    """Parse a whole file; malformed lines are skipped with a warning naming the line."""
    entries: dict[str, PasswdEntry] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            entry = parse_line(raw.decode("utf-8"), number)
        except UnicodeDecodeError:
            log.warning("%s:%d: skipped: not valid UTF-8", source, number)
            continue
        except ValueError as exc:
            log.warning("%s:%d: skipped: %s", source, number, exc)
            continue
        if entry is None:
            continue
        name = entry.record.name
        if name in entries:
            # Dovecot keeps the first line for a user; so do we, loudly.
            first = entries[name].line_number
            log.warning("%s:%d: skipped: user %s already on line %d", source, number, name, first)
            continue
        for problem in entry.problems:
            log.warning("%s:%d: user %s: %s", source, number, name, problem)
        if not entry.can_login:
            log.warning("%s:%d: user %s cannot log in: %s", source, number, name, why_not(entry))
        elif NOPASSWORD in entry.record.extra:
            log.warning(
                "%s:%d: user %s: nopassword: any password logs in from %s",
                source, number, name, entry.record.extra["allow_nets"],
            )
        entries[name] = entry
    return entries


def check_file_safety(info: os.stat_result, path: Path, what: str = "passwd file") -> None:
    """Refuse a passwd file that someone else could write; warn if anyone can read it.

    Whoever can write the file can give themselves any user's mailbox, so a file that
    is group- or world-writable, or owned by a user other than us or root, is refused.
    ``what`` names the file in the messages (the side file of app passwords too).
    """
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path}: {what} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod go-w {path}"
        )
    if info.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"{path}: {what} is owned by uid {info.st_uid}, who could rewrite it; "
            "it must belong to root or to the user popbox runs as"
        )
    if info.st_mode & stat.S_IROTH:
        log.warning("%s: %s is readable by everyone; run: chmod o-r %s", path, what, path)


def _check_side_file(info: os.stat_result, path: Path) -> None:
    check_file_safety(info, path, "app-password file")


class PasswdFilePassDB:
    """A PassDB over a Dovecot-format passwd file.

    Unknown users are checked against a dummy hash with the scheme and cost most
    common in the file (the default scheme while the file is empty), so they cost
    what a wrong password costs and get the same reply. The file is re-read when its
    stat changes, checked at most every ``check_interval`` seconds; a new version
    that cannot be read or is unsafe is refused and the old contents stay in use.
    Invalid usernames are treated as unknown users.
    """

    def __init__(
        self,
        path: Path,
        *,
        default_scheme: str = DEFAULT_SCHEME,
        check_interval: float = RELOAD_CHECK_INTERVAL,
        hasher: Hasher | None = None,
        credentials: Path | None = None,
    ) -> None:
        """``hasher`` runs the password checks (default: the process's shared one).
        ``credentials``: the side file of app passwords and APOP secrets
        (auth.credentials); without one, users have neither."""
        self._path = Path(path)
        self._credentials = (
            CredentialFile(credentials, _check_side_file) if credentials is not None else None
        )
        self._hasher = hasher if hasher is not None else shared_hasher()
        # A missing file keeps the users loaded before: a passwd file being replaced
        # by hand must not log everyone out.
        self._file: WatchedFile[dict[str, PasswdEntry]] = WatchedFile(
            self._path,
            lambda data: parse_passwd(data, source=str(self._path)),
            dict,
            check_file_safety,
            "users",
            keep_when_missing=True,
            check_interval=check_interval,
        )
        self._imitator = Imitator(default_scheme)
        self._imitation = self._imitator.empty
        self._refresh(force=True, strict=True)

    @property
    def path(self) -> Path:
        return self._path

    def reload(self) -> None:
        """Check the file now (SIGHUP, tests) instead of waiting for the interval."""
        self._refresh(force=True, strict=False)

    @property
    def credentials_path(self) -> Path | None:
        return self._credentials.path if self._credentials is not None else None

    def users(self) -> list[UserRecord]:
        """Every user in the file as last loaded, in file order."""
        self._maybe_refresh()
        return [entry.record for entry in self._file.contents.values()]

    def cached_record(self, username: str) -> UserRecord | None:
        """The user as last loaded, without looking at the file (auth.base.CachedUsers)."""
        entry = self._file.contents.get(username)
        return entry.record if entry is not None else None

    def _maybe_refresh(self) -> None:
        if self._may_have_changed():
            self._reload_changed()

    def _may_have_changed(self) -> bool:
        """False when neither the passwd file nor the side file changed: a stat() of
        each, on any thread."""
        side = self._credentials
        return self._file.changed() or (side is not None and side.changed())

    def _reload_changed(self) -> None:
        """Re-read the files if they changed (blocking: a worker thread's job)."""
        if self._credentials is not None:
            self._credentials.refresh()
        self._refresh(force=False, strict=False)

    def _refresh(self, *, force: bool, strict: bool) -> None:
        """Re-read the passwd file if it changed; ``strict`` raises ConfigError for a
        file that cannot be read or is unsafe (at start)."""
        if self._file.refresh(force=force, strict=strict):
            self._imitation = self._imitator.imitate(self._file.contents.values())
            log.info("%s: loaded %d users", self._path, len(self._file.contents))

    def _entry(self, username: str, *, check: bool = True) -> PasswdEntry | None:
        """``check=False``: the caller has just found the file unchanged."""
        if check:
            self._maybe_refresh()
        if not is_valid_username(username):
            return None
        return self._file.contents.get(username)

    def _verify_blocking(
        self, username: str, password: str, changed: bool = True
    ) -> UserRecord | None:
        if changed:
            self._reload_changed()
        entry = self._entry(username, check=False)
        app = None
        if entry is not None and entry.can_login:
            app = self._app_password(username, password)
        return check_password(entry, password, self._imitation, app)

    def _app_password(self, username: str, password: str) -> tuple[AppPassword, str] | None:
        """The user's app password this password names by its id, with the password
        as it was hashed; None if it names none (then it is the user's own)."""
        if self._credentials is None:
            return None
        key = app_password_key(password)
        if key is None:
            return None
        app = self._credentials.app_password(username, key[0])
        return (app, key[1]) if app is not None else None

    def _lookup_blocking(self, username: str) -> UserRecord | None:
        entry = self._entry(username)
        return entry.record if entry is not None else None

    def _apop_blocking(self, username: str) -> str | None:
        entry = self._entry(username)
        if self._credentials is None:
            return None
        return apop_secret_for(entry, self._credentials.apop_secret(username))

    def _scram_blocking(self, username: str, hash_name: str, changed: bool) -> ScramCredentials:
        if changed:
            self._reload_changed()
        entry = self._entry(username, check=False)
        return scram_credentials_for(entry, username, hash_name, self._imitation)

    async def scram_credentials(self, username: str, hash_name: str) -> ScramCredentials:
        """``username``'s SCRAM credentials, or fakes saying why there are none."""
        if hash_name not in SCRAM_HASHES:
            raise ValueError(f"not a SCRAM hash: {hash_name!r}")
        changed = self._may_have_changed()
        return await self._hasher.run(self._scram_blocking, username, hash_name, changed)

    async def verify(self, username: str, password: str) -> UserRecord | None:
        """The user if the password is right; None for a wrong password or unknown user."""
        # The Hasher's threads, not the default executor: see popbox.auth.hasher. The
        # stat of the file is made here, on the loop (microseconds), not on the hashing
        # thread, where each system call gives up the GIL and must win it back from
        # the loop; a file that changed is re-read on the thread, as before.
        changed = self._may_have_changed()
        return await self._hasher.run(self._verify_blocking, username, password, changed)

    async def lookup(self, username: str) -> UserRecord | None:
        """The user, without a password check (delivery, quotas); None if unknown."""
        return await asyncio.to_thread(self._lookup_blocking, username)

    async def plaintext_secret(self, username: str) -> str | None:
        """The user's APOP secret from the side file (never their password); None for
        a user without one and for unknown users."""
        return await asyncio.to_thread(self._apop_blocking, username)


