"""Users from a Dovecot-format passwd file, reloaded when the file changes.

One user per line, ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields``, with
everything after the password optional; ``#`` comments and blank lines are ignored.
Extra fields are space-separated ``key=value`` (or bare ``key``) pairs; the quota
rules Dovecot reads from them (``userdb_quota_rule=*:storage=1G``,
``userdb_quota_rule2=*:messages=1000``, or the same without ``userdb_``) become the
user's quota. The home field and the ``mail``/``userdb_mail`` extra field say where
the user's Maildir is (store.location); uid, gid, gecos and shell are accepted and
ignored: popbox runs as one user. The login restrictions (``allow_nets``,
``nologin``, ``proxy``, ...) are kept in ``extra`` for the login broker
(auth.restrictions); ``nopassword`` lets any password in only beside ``allow_nets``.
``reason=`` runs to the end of the line, so nologin's reason may hold spaces.

App passwords and APOP secrets come from a side file (auth.credentials).

Usernames are case-sensitive, as in Dovecot's passwd-file by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from popbox.auth.base import SCRAM_HASHES, ScramCredentials, UserRecord
from popbox.auth.credentials import AppPassword, CredentialFile, app_password_key
from popbox.auth.hasher import Hasher, shared_hasher
from popbox.auth.names import is_valid_username, validate_username
from popbox.auth.schemes import (
    DEFAULT_SCHEME,
    cost_signature,
    hash_like,
    hash_password,
    plaintext_of,
    problem_with,
    scram_credentials_of,
    scram_iterations_of,
    verify_password,
)
from popbox.auth.scram import (
    DEFAULT_SCRAM_ITERATIONS,
    derive_credentials,
    fake_credentials,
    plain_salt,
)
from popbox.auth.watched import WatchedFile
from popbox.errors import ConfigError, InvalidUsername

__all__ = [
    "RELOAD_CHECK_INTERVAL",
    "PasswdEntry",
    "PasswdFilePassDB",
    "check_file_safety",
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

# The fields of a line: user, password, uid, gid, gecos, home, shell, extra. The extra
# fields may themselves hold ':' (``*:storage=1G``), so the split stops at 8.
PASSWD_FIELDS: Final = 8

# Dovecot's quota rule keys: quota_rule, quota_rule2, ... with or without userdb_.
QUOTA_RULE_KEY: Final = re.compile(r"(?:userdb_)?quota_rule\d*")

# Extra fields with which Dovecot refuses a login that popbox does not otherwise
# honour: fail closed rather than let in a user whom Dovecot would have kept out.
# (allow_nets, nologin, proxy, host are honoured by the login broker.)
FAIL_CLOSED_FIELDS: Final = frozenset({"fail"})
# Dovecot's "any password will do". Honoured only for a user bound to networks by
# allow_nets: alone, it would open the mailbox to anyone who knows the name.
NOPASSWORD: Final = "nopassword"
# The extra field whose value runs to the end of the line (nologin's message).
REST_OF_LINE_FIELD: Final = "reason"
# The positional field that holds the home directory.
HOME_FIELD: Final = 5

# Dovecot's size suffixes, 1024-based; "storage=" without one is in kilobytes and
# "bytes=" in bytes (Dovecot's quota rule parser).
_SIZE_UNITS: Final = {"": None, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE: Final = re.compile(r"([0-9]{1,20})\s*([bBkKmMgGtT]?)[bB]?")


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    """One user's line: the stored password and what the rest of the line says."""

    record: UserRecord
    password: str
    """The stored ``{SCHEME}data`` value; empty when the line has none."""
    line_number: int
    can_login: bool
    """False for an unusable password or a fail-closed extra field; verify never succeeds."""
    problems: tuple[str, ...] = ()
    """What was ignored on the line (a quota rule popbox cannot honour), for the log."""


def parse_size(value: str, default_unit: int = 1) -> int:
    """Parse ``10M``, ``1G``, ``512k``, ``100B`` or a bare number (in ``default_unit``).

    Units are 1024-based, as in Dovecot; ``default_unit`` is 1 (bytes) except for
    Dovecot's ``storage=``, whose bare numbers are kilobytes.
    """
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a size (a number with an optional B/k/M/G/T)")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS[unit.upper()] or default_unit
    return int(number) * multiplier


def parse_extra_fields(text: str) -> dict[str, str]:
    """Split Dovecot extra fields: ``a=1 b c=x=y`` -> {a: 1, b: "", c: x=y}.

    ``reason=`` takes the rest of the line, spaces and all (it is a sentence).
    """
    fields: dict[str, str] = {}
    rest = text.strip()
    while rest:
        token, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        key, _, value = token.partition("=")
        if key == REST_OF_LINE_FIELD and rest:
            value, rest = f"{value} {rest}".strip(), ""
        if key:
            fields[key] = value
    return fields


def quota_from_fields(fields: Mapping[str, str]) -> tuple[int | None, int | None]:
    """``(quota_messages, quota_octets)`` from Dovecot quota rules for ``*``.

    Rules for other mailboxes (Trash, ...) do not apply to a POP3 maildrop and are
    ignored. 0 means "no limit", as in Dovecot and in popbox's [quota] settings.
    Raises ValueError for a rule popbox cannot honour (relative or percentage limits).
    """
    messages: int | None = None
    octets: int | None = None
    for key, rule in fields.items():
        if QUOTA_RULE_KEY.fullmatch(key) is None:
            continue
        mailbox, _, limits = rule.partition(":")
        if mailbox != "*":
            continue
        for limit in limits.split(":"):
            name, _, value = limit.partition("=")
            if value.startswith(("+", "-")) or value.endswith("%"):
                raise ValueError(f"{key}: relative limit {limit!r} is not supported")
            if name == "storage":
                octets = parse_size(value, 1024)
            elif name == "bytes":
                octets = parse_size(value, 1)
            elif name == "messages":
                messages = parse_size(value, 1)
            elif name not in ("", "ignore"):
                raise ValueError(f"{key}: unknown limit {limit!r}")
    return messages, octets


def parse_line(line: str, line_number: int = 0) -> PasswdEntry | None:
    """Parse one line; None for a comment or blank line, ValueError if malformed."""
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":", PASSWD_FIELDS - 1)
    if len(fields) < 2:
        raise ValueError("no ':' after the username")
    try:
        name = validate_username(fields[0])
    except InvalidUsername as exc:
        raise ValueError(str(exc)) from exc
    extra = parse_extra_fields(fields[7]) if len(fields) == PASSWD_FIELDS else {}
    problems: tuple[str, ...] = ()
    try:
        messages, octets = quota_from_fields(extra)
    except ValueError as exc:
        # Keep the user (with the default quota) rather than bounce all their mail
        # over a typo in a quota rule; the log says what was ignored.
        messages, octets, problems = None, None, (f"quota ignored: {exc}",)
    record = UserRecord(
        name=name,
        quota_messages=messages,
        quota_octets=octets,
        extra={k: v for k, v in extra.items() if QUOTA_RULE_KEY.fullmatch(k) is None},
        home=fields[HOME_FIELD] if len(fields) > HOME_FIELD else "",
    )
    password = fields[1]
    if NOPASSWORD in extra:
        # Dovecot's form is an empty password with nopassword; a hash beside it is moot.
        can_login = "allow_nets" in extra and not FAIL_CLOSED_FIELDS & extra.keys()
    else:
        can_login = problem_with(password) is None and not FAIL_CLOSED_FIELDS & extra.keys()
    return PasswdEntry(record, password, line_number, can_login, problems)


def why_not(entry: PasswdEntry) -> str:
    """Why ``entry`` can never log in, for the log."""
    extra = entry.record.extra
    if NOPASSWORD in extra and "allow_nets" not in extra:
        return "nopassword without allow_nets (any password from anywhere) is refused"
    if FAIL_CLOSED_FIELDS & extra.keys():
        fields = ", ".join(sorted(FAIL_CLOSED_FIELDS & extra.keys()))
        return f"a field that refuses every login ({fields})"
    return problem_with(entry.password) or "unusable password"


def mail_fields(record: UserRecord) -> tuple[str, str]:
    """``(home, mail)``: the home field and the ``mail`` (or ``userdb_mail``) field."""
    extra = record.extra
    return record.home, extra.get("userdb_mail") or extra.get("mail") or ""


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
        # Made once: a fresh random password nobody knows, hashed the way new users
        # are, for unknown users while the file has no usable hash to imitate.
        self._default_dummy = hash_password(secrets.token_urlsafe(24), default_scheme)
        self._dummies: dict[str, str] = {}
        self._dummy = self._default_dummy
        # Per SCRAM hash, the iteration count most keys in the file have: the count
        # that derived and fake credentials show too.
        self._scram_iterations: dict[str, int] = {}
        # The SCRAM hashes for which most users' keys are derived from a {PLAIN}
        # password at login (a PBKDF2): a user without keys pays one too, so that the
        # time to the server's first message does not tell who exists.
        self._scram_derived: frozenset[str] = frozenset()
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
            entries = self._file.contents.values()
            self._dummy = self._dummy_like(entries)
            self._scram_iterations = _common_scram_iterations(entries)
            self._scram_derived = _mostly_derived_scram(entries)
            log.info("%s: loaded %d users", self._path, len(self._file.contents))

    def _dummy_like(self, entries: Iterable[PasswdEntry]) -> str:
        """A dummy hash costing what most users' hashes cost; cached per signature."""
        signatures: Counter[str] = Counter()
        example: dict[str, str] = {}
        for entry in entries:
            signature = cost_signature(entry.password) if entry.can_login else None
            if signature is not None:
                signatures[signature] += 1
                example.setdefault(signature, entry.password)
        if not signatures:
            return self._default_dummy
        common = signatures.most_common(1)[0][0]
        if common not in self._dummies:
            self._dummies[common] = hash_like(secrets.token_urlsafe(24), example[common])
        return self._dummies[common]

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
        if entry is None or not entry.can_login:
            # The hash runs whatever the outcome, so every failure costs the same work.
            verify_password(password, self._dummy)
            return None
        app = self._app_password(username, password)
        if app is not None:
            # Exactly one hash either way: the id in the password picked this one.
            matched = verify_password(app[1], app[0].hashed)
            return replace(entry.record, credential=app[0].label) if matched else None
        matched = verify_password(password, entry.password or self._dummy)
        if NOPASSWORD in entry.record.extra:
            matched = True  # can_login: allow_nets is there, and the broker applies it
        return entry.record if matched else None

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
        if entry is None or not entry.can_login or self._credentials is None:
            return None
        if NOPASSWORD in entry.record.extra:
            return None  # any password, but not any APOP digest: there is no secret
        return self._credentials.apop_secret(username)

    def _scram_blocking(self, username: str, hash_name: str, changed: bool) -> ScramCredentials:
        if changed:
            self._reload_changed()
        entry = self._entry(username, check=False)
        iterations = self._scram_iterations.get(hash_name, DEFAULT_SCRAM_ITERATIONS)
        if entry is None:
            problem = "unknown user"
        elif not entry.can_login:
            problem = "login disabled: " + (problem_with(entry.password) or "a refusing field")
        else:
            found = scram_credentials_of(
                entry.password, hash_name, username=username, iterations=iterations
            )
            if isinstance(found, ScramCredentials):
                return found
            problem = found
        if hash_name in self._scram_derived:
            # The work a {PLAIN} user's keys cost, for a secret nobody has.
            derive_credentials(
                self._default_dummy,
                hash_name,
                salt=plain_salt(username, hash_name),
                iterations=iterations,
            )
        return fake_credentials(username, hash_name, iterations=iterations, problem=problem)

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



def _mostly_derived_scram(entries: Iterable[PasswdEntry]) -> frozenset[str]:
    """The SCRAM hashes for which more users have a {PLAIN} password (keys derived at
    each login) than stored keys."""
    derived: Counter[str] = Counter()
    stored: Counter[str] = Counter()
    for entry in entries:
        if not entry.can_login:
            continue
        plain = plaintext_of(entry.password) is not None
        for name in SCRAM_HASHES:
            if scram_iterations_of(entry.password, name) is not None:
                stored[name] += 1
            elif plain:
                derived[name] += 1
    return frozenset(name for name in SCRAM_HASHES if derived[name] > stored[name])


def _common_scram_iterations(entries: Iterable[PasswdEntry]) -> dict[str, int]:
    """Per SCRAM hash, the iteration count most of the file's keys of it have."""
    counts: dict[str, Counter[int]] = {name: Counter() for name in SCRAM_HASHES}
    for entry in entries:
        for name, counter in counts.items():
            iterations = scram_iterations_of(entry.password, name)
            if iterations is not None:
                counter[iterations] += 1
    return {name: c.most_common(1)[0][0] for name, c in counts.items() if c}
