"""A user's entry: the columns of a Dovecot passwd line and their one reading.

``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields``, everything after the
password optional. Extra fields are space-separated ``key=value`` (or bare ``key``)
tokens, kept in order; the quota rules Dovecot reads from them
(``userdb_quota_rule=*:storage=1G``, ``userdb_quota_rule2=*:messages=1000``, or the
same without ``userdb_``) become the user's quota. The home field and the
``mail``/``userdb_mail`` extra field say where the user's Maildir is
(store.location); uid, gid, gecos and shell are kept and ignored: popbox runs as one
user. The login restrictions (``allow_nets``, ``nologin``, ``proxy``, ...) stay in
``extra`` for the login broker (auth.restrictions); ``nopassword`` lets any password
in only beside ``allow_nets``. ``reason=`` runs to the end of the line, so nologin's
reason may hold spaces.

The passwd file (auth.passwdfile) and the PostgreSQL user table (auth.postgresql)
hold the same columns, so one line gives the same UserRecord from either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from popbox.auth.base import UserRecord
from popbox.auth.names import validate_username
from popbox.auth.schemes import problem_with
from popbox.errors import InvalidUsername

__all__ = [
    "FAIL_CLOSED_FIELDS",
    "NOPASSWORD",
    "PASSWD_FIELDS",
    "QUOTA_RULE_KEY",
    "PasswdEntry",
    "PasswdFields",
    "entry_of",
    "extra_fields_of",
    "mail_fields",
    "parse_extra_fields",
    "parse_line",
    "parse_size",
    "quota_from_fields",
    "split_extra_fields",
    "split_line",
    "why_not",
]

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
    fields: PasswdFields | None = None
    """The columns the entry was read from."""


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


def split_extra_fields(text: str) -> tuple[str, ...]:
    """Dovecot extra fields as tokens, in order: ``a=1 b c=x=y`` -> (a=1, b, c=x=y).

    ``reason=`` takes the rest of the line, spaces and all (it is a sentence).
    """
    tokens: list[str] = []
    rest = text.strip()
    while rest:
        token, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        if token.partition("=")[0] == REST_OF_LINE_FIELD and rest:
            token, rest = f"{token} {rest}".strip(), ""
        tokens.append(token)
    return tuple(tokens)


def extra_fields_of(tokens: Iterable[str]) -> dict[str, str]:
    """The fields of ``tokens`` (split_extra_fields): a later key wins, in the first
    one's place; a bare key has the value ""."""
    fields: dict[str, str] = {}
    for token in tokens:
        key, _, value = token.partition("=")
        if key:
            fields[key] = value
    return fields


def parse_extra_fields(text: str) -> dict[str, str]:
    """Split Dovecot extra fields: ``a=1 b c=x=y`` -> {a: 1, b: "", c: x=y}."""
    return extra_fields_of(split_extra_fields(text))


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


@dataclass(frozen=True, slots=True)
class PasswdFields:
    """The columns of one passwd line as written (what a user table stores)."""

    name: str
    password: str = ""
    uid: str = ""
    gid: str = ""
    gecos: str = ""
    home: str = ""
    shell: str = ""
    extra: tuple[str, ...] = ()
    """The extra fields as tokens, in order (split_extra_fields)."""

    def line(self) -> str:
        """The passwd line these columns make (without its newline)."""
        columns = [self.name, self.password, self.uid, self.gid, self.gecos, self.home]
        return ":".join([*columns, self.shell, " ".join(self.extra)])


def split_line(line: str) -> PasswdFields | None:
    """A line's columns; None for a comment or blank line, ValueError without a ':'."""
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":", PASSWD_FIELDS - 1)
    if len(fields) < 2:
        raise ValueError("no ':' after the username")
    fields += [""] * (PASSWD_FIELDS - len(fields))
    name, password, uid, gid, gecos, home, shell, extra = fields
    return PasswdFields(name, password, uid, gid, gecos, home, shell, split_extra_fields(extra))


def entry_of(fields: PasswdFields, line_number: int = 0) -> PasswdEntry:
    """The user the columns describe (ValueError for a name that can be no user):
    the one reading of a user for the passwd file and a user table alike."""
    try:
        name = validate_username(fields.name)
    except InvalidUsername as exc:
        raise ValueError(str(exc)) from exc
    extra = extra_fields_of(fields.extra)
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
        home=fields.home,
    )
    password = fields.password
    if NOPASSWORD in extra:
        # Dovecot's form is an empty password with nopassword; a hash beside it is moot.
        can_login = "allow_nets" in extra and not FAIL_CLOSED_FIELDS & extra.keys()
    else:
        can_login = problem_with(password) is None and not FAIL_CLOSED_FIELDS & extra.keys()
    return PasswdEntry(record, password, line_number, can_login, problems, fields)


def parse_line(line: str, line_number: int = 0) -> PasswdEntry | None:
    """Parse one line; None for a comment or blank line, ValueError if malformed."""
    fields = split_line(line)
    return entry_of(fields, line_number) if fields is not None else None


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


