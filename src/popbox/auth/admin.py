"""Edits to a passwd file for ``popbox user``: atomic, serialised, and leaving the rest alone.

The side file of app passwords and APOP secrets (auth.credentials) is edited the
same way, under its own lock.

Every edit takes an exclusive flock on a sidecar ``PASSWD.lock`` file, reads the
current file, changes only the one user's line, and replaces the file atomically
(write a temporary file in the same directory, fsync, rename, fsync the directory).
A server reading the file meanwhile sees the old or the new version, never half of
one, and two ``popbox user add`` at once both land. Comments, blank lines, other
users' lines and unknown extra fields are kept byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from popbox.auth.base import UserRecord
from popbox.auth.credentials import (
    KIND_APOP,
    KIND_APP,
    MAX_APP_PASSWORDS_PER_USER,
    AppPassword,
    app_password_key,
    check_label,
    generate_apop_secret,
    generate_app_password,
    parse_credentials,
)
from popbox.auth.entries import (
    PASSWD_FIELDS,
    QUOTA_RULE_KEY,
    REST_OF_LINE_FIELD,
    parse_line,
    split_extra_fields,
)
from popbox.auth.names import validate_username
from popbox.auth.passwdfile import parse_passwd
from popbox.auth.schemes import DEFAULT_COST, DEFAULT_SCHEME, HashCost, hash_password
from popbox.errors import AuthError
from popbox.fileio import FileLock, fsync_dir

__all__ = [
    "NoSuchCredential",
    "NoSuchUser",
    "UserExists",
    "add_app_password",
    "add_user",
    "delete_user",
    "format_size",
    "list_app_passwords",
    "list_users",
    "quota_fields",
    "remove_credentials",
    "revoke_app_password",
    "set_apop_secret",
    "set_password",
    "set_quota",
    "stored_password",
]

# A new passwd file holds password hashes: readable by its owner only.
NEW_FILE_MODE: Final = 0o600
# The directory that holds it (the data dir by default) is private too.
NEW_DIR_MODE: Final = 0o700
# The lock lives beside the file and is never removed: unlinking a lock file that
# another process is waiting on lets two processes hold "the" lock at once.
LOCK_SUFFIX: Final = ".lock"

# Characters that would break a passwd line apart if a stored value held them;
# only a {PLAIN} password can, and {PLAIN.B64} stores any password safely.
_LINE_BREAKERS: Final = frozenset(":\n\r\0")

_UNITS: Final = (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("k", 1024))


class UserExists(AuthError):
    """add_user: the passwd file already has a line for this user."""


class NoSuchUser(AuthError):
    """set_password, delete_user, set_quota: the passwd file has no line for this user."""


class NoSuchCredential(AuthError):
    """revoke_app_password: the user has no app password with this label."""


def format_size(octets: int) -> str:
    """A Dovecot size with the largest exact 1024-based unit: 1073741824 -> ``1G``."""
    for suffix, factor in _UNITS:
        if octets and octets % factor == 0:
            return f"{octets // factor}{suffix}"
    return f"{octets}B"


@contextlib.contextmanager
def _os_errors(path: Path, doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise AuthError(f"{path}: cannot {doing}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive edit lock for ``path``, creating its directory if needed."""
    with _os_errors(path, "lock"):
        path.parent.mkdir(mode=NEW_DIR_MODE, parents=True, exist_ok=True)
        lock = FileLock(path.with_name(path.name + LOCK_SUFFIX), wait=True)
    with lock:
        yield


def _real(path: Path) -> Path:
    # Edit the file a symlink points at, not replace the symlink with a regular file.
    return Path(os.path.realpath(path))


def _read_lines(path: Path) -> list[str]:
    """The file's lines without their newlines; [] for a missing file."""
    with _os_errors(path, "read"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
    # surrogateescape: a line we do not understand is written back exactly as it was.
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    """Replace ``path`` atomically; keep its mode (minus group/other write) and owner."""
    text = "".join(line + "\n" for line in lines)
    with _os_errors(path, "write"):
        try:
            old = os.stat(path)
        except FileNotFoundError:
            mode, owner = NEW_FILE_MODE, None
        else:
            mode = stat.S_IMODE(old.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH)
            owner = (old.st_uid, old.st_gid)
        # mkstemp creates the file 0600, so the hashes are never readable by others,
        # not even between creation and the chmod below.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text.encode("utf-8", "surrogateescape"))
                handle.flush()
                if owner is not None and os.geteuid() == 0:
                    os.fchown(handle.fileno(), *owner)
                os.fchmod(handle.fileno(), mode)
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        fsync_dir(path.parent)


def _find(lines: list[str], name: str) -> int | None:
    for index, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            continue
        if line.split(":", 1)[0] == name:
            return index
    return None


def stored_password(password: str, scheme: str, cost: HashCost) -> str:
    """``password`` hashed in ``scheme``, as a passwd line may hold it (AuthError)."""
    try:
        stored = hash_password(password, scheme, cost=cost)
    except ValueError as exc:
        raise AuthError(str(exc)) from exc
    if _LINE_BREAKERS & set(stored):
        raise AuthError("a {PLAIN} password cannot hold ':', NUL or line breaks; use PLAIN.B64")
    return stored


def quota_fields(
    existing: Sequence[str], messages: int | None, octets: int | None
) -> list[str]:
    """Extra-field tokens with the ``*`` quota rules replaced by the given limits
    (a ``reason=`` token stays last: it runs to the end of the line)."""
    for limit in (messages, octets):
        if limit is not None and limit < 0:
            raise AuthError("a quota cannot be negative (0 means no limit)")
    kept = []
    for token in existing:
        key, _, value = token.partition("=")
        if QUOTA_RULE_KEY.fullmatch(key) and value.startswith("*:"):
            continue  # replaced below
        kept.append(token)
    taken = {token.partition("=")[0] for token in kept}
    free = (f"userdb_quota_rule{n if n > 1 else ''}" for n in range(1, len(taken) + 4))
    keys = [key for key in free if key not in taken]
    rules = []
    if octets is not None:
        rules.append(f"*:storage={format_size(octets)}")
    if messages is not None:
        rules.append(f"*:messages={messages}")
    added = [f"{key}={rule}" for key, rule in zip(keys, rules, strict=False)]
    last = [token for token in kept if token.partition("=")[0] == REST_OF_LINE_FIELD]
    return [token for token in kept if token not in last] + added + last


def _with_fields(line: str, password: str | None, extra: list[str] | None) -> str:
    fields = line.split(":", PASSWD_FIELDS - 1)
    if password is not None:
        fields[1] = password
    if extra is not None:
        fields += [""] * (PASSWD_FIELDS - len(fields))
        fields[7] = " ".join(extra)
    return ":".join(fields)


def _checked(line: str) -> str:
    """``line`` if it parses back to a user, else AuthError (never write a bad line)."""
    try:
        entry = parse_line(line)
    except ValueError as exc:
        raise AuthError(f"refusing to write an unparsable line: {exc}") from exc
    if entry is None or entry.problems:
        raise AuthError("refusing to write a line that does not parse back cleanly")
    return line


def add_user(
    path: Path,
    name: str,
    password: str,
    *,
    scheme: str = DEFAULT_SCHEME,
    quota_messages: int | None = None,
    quota_octets: int | None = None,
    cost: HashCost = DEFAULT_COST,
) -> UserRecord:
    """Add ``name`` with a new hash of ``password``; UserExists if already present.

    Creates the file (0600) and its directory (0700) when missing.
    """
    validate_username(name)
    stored = stored_password(password, scheme, cost)
    extra = quota_fields([], quota_messages, quota_octets)
    line = _checked(_with_fields(f"{name}:{stored}", None, extra))
    path = _real(path)
    with _locked(path):
        lines = _read_lines(path)
        if _find(lines, name) is not None:
            raise UserExists(f"user {name} already exists in {path}")
        _write_lines(path, [*lines, line])
    return UserRecord(name=name, quota_messages=quota_messages, quota_octets=quota_octets)


def set_password(
    path: Path,
    name: str,
    password: str,
    *,
    scheme: str = DEFAULT_SCHEME,
    cost: HashCost = DEFAULT_COST,
) -> None:
    """Replace ``name``'s password hash; the rest of the line stays as it was."""
    validate_username(name)
    stored = stored_password(password, scheme, cost)
    path = _real(path)
    with _locked(path):
        lines = _read_lines(path)
        index = _find(lines, name)
        if index is None:
            raise NoSuchUser(f"no user {name} in {path}")
        lines[index] = _with_fields(lines[index], stored, None)
        _write_lines(path, lines)


def delete_user(path: Path, name: str) -> None:
    """Remove ``name``'s line; NoSuchUser if there is none. Mail is not touched."""
    validate_username(name)
    path = _real(path)
    with _locked(path):
        lines = _read_lines(path)
        index = _find(lines, name)
        if index is None:
            raise NoSuchUser(f"no user {name} in {path}")
        del lines[index]
        _write_lines(path, lines)


def set_quota(path: Path, name: str, messages: int | None, octets: int | None) -> None:
    """Set ``name``'s per-user quota (None: the configured default; 0: no limit).

    Writes Dovecot's ``userdb_quota_rule=*:storage=...`` and ``*:messages=...``
    fields, replacing any earlier ``*`` rules and keeping every other field.
    """
    validate_username(name)
    path = _real(path)
    with _locked(path):
        lines = _read_lines(path)
        index = _find(lines, name)
        if index is None:
            raise NoSuchUser(f"no user {name} in {path}")
        fields = lines[index].split(":", PASSWD_FIELDS - 1)
        existing = split_extra_fields(fields[7]) if len(fields) == PASSWD_FIELDS else ()
        extra = quota_fields(existing, messages, octets)
        lines[index] = _checked(_with_fields(lines[index], None, extra))
        _write_lines(path, lines)


def list_users(path: Path) -> list[UserRecord]:
    """Every user in the file, in file order; [] if the file does not exist.

    Reads without the lock: edits replace the file atomically, so a reader sees one
    whole version. Malformed lines are skipped and logged, as the server does.
    """
    path = _real(path)
    with _os_errors(path, "read"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
    return [entry.record for entry in parse_passwd(data, source=str(path)).values()]


# -- app passwords and APOP secrets (the side file) -------------------------------------


def _credential_lines(lines: list[str], user: str, kind: str) -> list[tuple[int, str]]:
    """(index, label) of ``user``'s lines of ``kind``."""
    found = []
    for index, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            continue
        columns = line.split(":", 3)
        if len(columns) == 4 and columns[0] == user and columns[1] == kind:
            found.append((index, columns[2]))
    return found


def _credential_line(user: str, kind: str, label: str, key_id: str, secret: str) -> str:
    line = f"{user}:{kind}:{label}:{key_id}:{secret}:{int(time.time())}"
    parsed = parse_credentials(line.encode(), source="new line")
    if user not in parsed:
        raise AuthError("refusing to write a credential line that does not parse back")
    return line


def add_app_password(
    path: Path,
    user: str,
    label: str,
    *,
    scheme: str = DEFAULT_SCHEME,
    cost: HashCost = DEFAULT_COST,
) -> str:
    """Add an app password labelled ``label`` for ``user`` and return it (the only
    time it is shown: only its hash is kept). AuthError if the label is taken."""
    validate_username(user)
    try:
        check_label(label)
    except ValueError as exc:
        raise AuthError(str(exc)) from exc
    key_id, password = generate_app_password()
    raw = app_password_key(password)
    assert raw is not None  # a generated password has the shape
    line = _credential_line(user, KIND_APP, label, key_id, stored_password(raw[1], scheme, cost))
    path = _real(path)
    with _locked(path):
        lines = _read_lines(path)
        taken = _credential_lines(lines, user, KIND_APP)
        if any(existing == label for _, existing in taken):
            raise AuthError(f"{user} already has an app password labelled {label}")
        if len(taken) >= MAX_APP_PASSWORDS_PER_USER:
            raise AuthError(
                f"{user} has {len(taken)} app passwords, the most one user may have; "
                "revoke some first"
            )
        _write_lines(path, [*lines, line])
    return password


def revoke_app_password(path: Path, user: str, label: str) -> None:
    """Remove ``user``'s app password ``label``: the next login with it fails."""
    validate_username(user)
    path = _real(path)
    with _locked(path):
        lines = _read_lines(path)
        found = [i for i, existing in _credential_lines(lines, user, KIND_APP) if existing == label]
        if not found:
            raise NoSuchCredential(f"{user} has no app password labelled {label}")
        _write_lines(path, [line for i, line in enumerate(lines) if i not in found])


def list_app_passwords(path: Path, user: str) -> list[AppPassword]:
    """``user``'s app passwords (labels, ids, creation times), by label."""
    validate_username(user)
    path = _real(path)
    with _os_errors(path, "read"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
    entry = parse_credentials(data, source=str(path)).get(user)
    return sorted(entry.apps.values(), key=lambda app: app.label) if entry else []


def set_apop_secret(path: Path, user: str, secret: str | None = None) -> str:
    """Give ``user`` a new APOP secret (generated unless given) and return it; it
    replaces the one before. Stored {PLAIN}: APOP needs it in the clear."""
    validate_username(user)
    secret = secret if secret is not None else generate_apop_secret()
    stored = stored_password(secret, "PLAIN", DEFAULT_COST)
    line = _credential_line(user, KIND_APOP, KIND_APOP, "", stored)
    path = _real(path)
    with _locked(path):
        lines = _read_lines(path)
        old = {i for i, _ in _credential_lines(lines, user, KIND_APOP)}
        _write_lines(path, [line for i, line in enumerate(lines) if i not in old] + [line])
    return secret


def remove_credentials(path: Path, user: str) -> int:
    """Remove every app password and the APOP secret of ``user`` (``popbox user del``);
    the number of lines removed."""
    validate_username(user)
    path = _real(path)
    if not path.exists():
        return 0
    with _locked(path):
        lines = _read_lines(path)
        gone = {
            i
            for kind in (KIND_APP, KIND_APOP)
            for i, _ in _credential_lines(lines, user, kind)
        }
        if gone:
            _write_lines(path, [line for i, line in enumerate(lines) if i not in gone])
    return len(gone)
