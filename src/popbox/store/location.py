"""Where a user's Maildir is: ``root/USER`` by default, or a Dovecot-style location.

A location is ``maildir:PATH[:KEY=VALUE...]`` (Dovecot's ``mail_location`` and its
userdb ``mail`` field) or a bare ``PATH``. The path may use Dovecot's variables:

    %u  %{user}       the whole user name           alice@example.org
    %n  %{username}   the part before '@' (all of it without one)   alice
    %d  %{domain}     the part after '@'            example.org
    %h  %{home}       the user's home directory
    %%                a literal '%'

and may start with ``~/`` for the home directory. The store asks a ``MailLocation``
for a user's Maildir and knows nothing of where the rule came from: the composition
root builds one from the config and the user database's home and ``mail`` fields.

Every result is checked: absolute, without ``.``/``..`` components, and with every
piece that came from the user name a plain directory name (``a@..`` cannot climb out
of ``/var/vmail/%d``). Dovecot's keys that only say where Dovecot keeps its own files
(``INDEX``, ``CONTROL``, ``VOLATILEDIR``) are accepted and ignored; ``LAYOUT=maildir++``
is popbox's own layout; every other key, and every format but ``maildir``, is refused
with an error naming the setting it came from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, Protocol

from popbox.errors import PermanentStoreError

__all__ = [
    "MAX_RESOLVED_USERS",
    "LocationTemplate",
    "MailLocation",
    "UnderRoot",
    "UserHome",
    "UserLocations",
    "parse_location",
]

# How many users' resolved Maildirs a process keeps: a resolve is a few string
# operations, the cache only spares logins the Path joins (as Mailboxes' layouts do).
MAX_RESOLVED_USERS: Final = 10_000
# Keys of Dovecot's mail location that place Dovecot's own files (indexes, control
# files, lock files): popbox keeps its index and state inside the Maildir, so these
# change nothing for it and a location copied from dovecot.conf may keep them.
IGNORED_KEYS: Final = frozenset({"INDEX", "CONTROL", "VOLATILEDIR", "ITERINDEX", "NO-NOSELECT"})
# The one layout popbox reads and writes: folders as .NAME inside the Maildir.
SUPPORTED_LAYOUTS: Final = frozenset({"maildir++"})

_VARIABLE: Final = re.compile(r"%(?:\{([a-z]+)\}|(.))")
_SHORT: Final = {"u": "user", "n": "username", "d": "domain", "h": "home", "%": "%"}
_LONG: Final = frozenset({"user", "username", "domain", "home"})


class MailLocation(Protocol):
    """Where a user's Maildir (their INBOX) is. Synchronous and cheap: asked at every
    login and delivery, on the event loop, so it does no I/O."""

    def maildir(self, user: str) -> Path:
        """The user's Maildir; PermanentStoreError if none can be made for them."""
        ...


@dataclass(frozen=True, slots=True)
class UserHome:
    """What the user database says of where a user's mail goes (may be empty)."""

    home: str = ""
    """The home directory (the passwd file's sixth field)."""
    mail: str = ""
    """The user's own mail location (the ``mail``/``userdb_mail`` extra field)."""


@dataclass(frozen=True, slots=True)
class LocationTemplate:
    """A parsed mail location: the path template and where it came from (for errors)."""

    path: str
    source: str

    @property
    def uses_home(self) -> bool:
        return self.path.startswith("~") or any(
            name == "home" for name in _variables(self.path)
        )

    def expand(self, user: str, home: str) -> Path:
        """The Maildir of ``user``; PermanentStoreError naming the source if unsafe."""
        local, at, domain = user.partition("@")
        values = {"user": user, "username": local, "domain": domain if at else "", "home": home}
        pieces = ((user, "name"), (local, "user part"), (domain, "domain"))
        for value, what in pieces[: 3 if at else 1]:
            if not _plain_name(value):
                raise PermanentStoreError(
                    f"{self.source}: user {user!r} has a {what} that cannot be a directory"
                )
        text = self.path
        if text == "~" or text.startswith("~/"):
            text = "%{home}" + text[1:]

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1) or _SHORT.get(match.group(2), "")
            if name == "%":
                return "%"
            if name == "home" and not home:
                raise PermanentStoreError(f"{self.source}: user {user!r} has no home directory")
            if name == "domain" and not values["domain"]:
                # Dovecot leaves %d empty; an empty component would put this user's
                # Maildir where a domain's directory is.
                raise PermanentStoreError(f"{self.source}: user {user!r} has no domain for %d")
            return values[name]

        path = PurePosixPath(_VARIABLE.sub(substitute, text))
        if not path.is_absolute():
            raise PermanentStoreError(f"{self.source}: {str(path)!r} is not an absolute path")
        if any(part in (".", "..") for part in str(path).split("/")):
            raise PermanentStoreError(f"{self.source}: {str(path)!r} holds '.' or '..'")
        return Path(path)


def _variables(path: str) -> list[str]:
    return [match.group(1) or _SHORT.get(match.group(2), "") for match in _VARIABLE.finditer(path)]


def _plain_name(value: str) -> bool:
    return bool(value) and not value.startswith(".") and "/" not in value


def parse_location(text: str, *, source: str) -> LocationTemplate:
    """Parse ``maildir:PATH[:KEY=VALUE...]`` or ``PATH``; ValueError naming ``source``.

    ``source`` names the setting or field the text came from (``storage.mail_location``,
    ``passwd line of alice: mail``), so an operator knows what to fix.
    """
    text = text.strip()
    if not text:
        raise ValueError(f"{source}: empty mail location")
    if text.startswith(("/", "~", "%")):
        path, params = text, []
    else:
        kind, sep, rest = text.partition(":")
        if not sep or kind != "maildir":
            shown = kind if sep else text
            raise ValueError(
                f"{source}: mail format {shown!r} is not supported; popbox reads "
                "maildir:PATH (e.g. maildir:~/Maildir)"
            )
        path, *params = rest.split(":")
    for param in params:
        key, _, value = param.partition("=")
        if key.upper() in IGNORED_KEYS:
            continue
        if key.upper() == "LAYOUT" and value.lower() in SUPPORTED_LAYOUTS:
            continue
        raise ValueError(
            f"{source}: {param!r} is not supported; popbox keeps folders as Maildir++ "
            "(.NAME inside the Maildir) and accepts only LAYOUT=maildir++ and "
            "Dovecot's INDEX/CONTROL/VOLATILEDIR keys"
        )
    if not path:
        raise ValueError(f"{source}: no path in {text!r}")
    for match in _VARIABLE.finditer(path):
        name, short = match.groups()
        if (name is not None and name not in _LONG) or (short is not None and short not in _SHORT):
            raise ValueError(
                f"{source}: unknown variable {match.group(0)!r}; use %u %n %d %h %% "
                "or %{user} %{username} %{domain} %{home}"
            )
    if not path.startswith(("/", "~/", "%h", "%{home}")) and path != "~":
        raise ValueError(f"{source}: {path!r} must be an absolute path (or start with ~/ or %h)")
    return LocationTemplate(path, source)


class UnderRoot:
    """``root/USER``: popbox's default, so installs made before locations did not move."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, Path] = {}

    def maildir(self, user: str) -> Path:
        path = self._cache.get(user)
        if path is None:
            if len(self._cache) >= MAX_RESOLVED_USERS:
                self._cache.clear()
            path = self._cache[user] = self.root / user
        return path


class UserLocations:
    """Each user's Maildir from their own ``mail`` field, else the configured template,
    else ``root/USER``; ``homes`` tells a user's home and mail fields (no I/O: the
    user database as last loaded)."""

    def __init__(
        self,
        homes: Callable[[str], UserHome | None],
        *,
        default: LocationTemplate | None,
        root: Path,
    ) -> None:
        self._homes = homes
        self._default = default
        self._under_root = UnderRoot(root)
        self._parsed: dict[str, LocationTemplate] = {}
        # (user, home, mail) -> Maildir: a changed home or mail field is a new key.
        self._cache: dict[tuple[str, str, str], Path] = {}

    def maildir(self, user: str) -> Path:
        found = self._homes(user) or UserHome()
        key = (user, found.home, found.mail)
        path = self._cache.get(key)
        if path is not None:
            return path
        template = self._template(user, found.mail)
        if template is None:
            path = self._under_root.maildir(user)
        else:
            path = template.expand(user, found.home)
        if len(self._cache) >= MAX_RESOLVED_USERS:
            self._cache.clear()
        self._cache[key] = path
        return path

    def _template(self, user: str, mail: str) -> LocationTemplate | None:
        if not mail:
            return self._default
        template = self._parsed.get(mail)
        if template is None:
            try:
                template = parse_location(mail, source="the user's mail field")
            except ValueError as exc:
                raise PermanentStoreError(str(exc)) from exc
            if len(self._parsed) >= MAX_RESOLVED_USERS:
                self._parsed.clear()
            self._parsed[mail] = template
        return template
