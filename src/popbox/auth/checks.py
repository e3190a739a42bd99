"""The checks every user database runs on a user's entry, the one way for all of them:
a password (one hash per attempt, a dummy's for a name that cannot log in), SCRAM's
keys (fakes that look and cost the same), the APOP secret; and the Imitation a
database's users give those dummies and fakes, so that no reply and no amount of
work tells which names exist. Everything here blocks (hashes): the Hasher's threads
run it.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace

from popbox.auth.base import SCRAM_HASHES, ScramCredentials, UserRecord
from popbox.auth.credentials import AppPassword
from popbox.auth.entries import NOPASSWORD, PasswdEntry
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

__all__ = [
    "Imitation",
    "Imitator",
    "apop_secret_for",
    "check_password",
    "scram_credentials_for",
]


class Imitation:
    """What an attempt for a name without a usable password imitates, taken from a
    database's users: the dummy hash (the scheme and cost most users' hashes have),
    per SCRAM hash the iteration count most keys have, and the SCRAM hashes for which
    most users' keys are derived from a {PLAIN} password at each login (a PBKDF2,
    which a name without keys then pays too, so that the time to the server's first
    message does not tell who exists)."""

    __slots__ = ("default_dummy", "dummy", "scram_derived", "scram_iterations")

    def __init__(
        self,
        dummy: str,
        default_dummy: str,
        scram_iterations: Mapping[str, int],
        scram_derived: frozenset[str],
    ) -> None:
        self.dummy = dummy
        self.default_dummy = default_dummy
        self.scram_iterations = scram_iterations
        self.scram_derived = scram_derived


class Imitator:
    """Makes the Imitation of a set of users; a dummy hash is made once per cost."""

    def __init__(self, default_scheme: str = DEFAULT_SCHEME) -> None:
        # Made once: a fresh random password nobody knows, hashed the way new users
        # are, for unknown users while there is no usable hash to imitate.
        self._default_dummy = hash_password(secrets.token_urlsafe(24), default_scheme)
        self._dummies: dict[str, str] = {}
        self.empty = Imitation(self._default_dummy, self._default_dummy, {}, frozenset())

    def imitate(self, entries: Iterable[PasswdEntry]) -> Imitation:
        """The Imitation of ``entries`` (blocking: a new cost's dummy is a hash)."""
        entries = list(entries)
        return Imitation(
            self._dummy_like(entries),
            self._default_dummy,
            _common_scram_iterations(entries),
            _mostly_derived_scram(entries),
        )

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


def check_password(
    entry: PasswdEntry | None,
    password: str,
    imitation: Imitation,
    app: tuple[AppPassword, str] | None = None,
) -> UserRecord | None:
    """The user if ``password`` is right for ``entry`` (blocking: one hash, always).

    ``app``: the user's app password that ``password`` names by its id, with the
    password as it was hashed (credentials.app_password_key); the record returned
    then names its label. An unknown or disabled user costs the dummy's hash.
    """
    if entry is None or not entry.can_login:
        # The hash runs whatever the outcome, so every failure costs the same work.
        verify_password(password, imitation.dummy)
        return None
    if app is not None:
        # Exactly one hash either way: the id in the password picked this one.
        matched = verify_password(app[1], app[0].hashed)
        return replace(entry.record, credential=app[0].label) if matched else None
    matched = verify_password(password, entry.password or imitation.dummy)
    if NOPASSWORD in entry.record.extra:
        matched = True  # can_login: allow_nets is there, and the broker applies it
    return entry.record if matched else None


def scram_credentials_for(
    entry: PasswdEntry | None, username: str, hash_name: str, imitation: Imitation
) -> ScramCredentials:
    """``entry``'s SCRAM credentials for ``hash_name``, or fakes saying why there are
    none that cost what most users' keys cost (blocking: may derive keys)."""
    iterations = imitation.scram_iterations.get(hash_name, DEFAULT_SCRAM_ITERATIONS)
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
    if hash_name in imitation.scram_derived:
        # The work a {PLAIN} user's keys cost, for a secret nobody has.
        derive_credentials(
            imitation.default_dummy,
            hash_name,
            salt=plain_salt(username, hash_name),
            iterations=iterations,
        )
    return fake_credentials(username, hash_name, iterations=iterations, problem=problem)


def apop_secret_for(entry: PasswdEntry | None, secret: str | None) -> str | None:
    """``secret`` if ``entry`` may log in with APOP: a user who can log in, and not
    by nopassword (any password, but not any APOP digest: there is no secret)."""
    if entry is None or not entry.can_login or NOPASSWORD in entry.record.extra:
        return None
    return secret



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
