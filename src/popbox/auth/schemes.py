"""Password schemes in Dovecot's ``{SCHEME}data`` notation, on maintained libraries.

A stored password is ``{SCHEME}data``; without the braces it is Dovecot's
``default_pass_scheme`` for passwd-file, CRYPT, whose algorithm is read from the hash
itself (``$argon2id$``, ``$2y$``, ``$6$``, ``$5$``, ``$1$``, 13-character DES). So a
passwd file written by ``doveadm pw`` works here unchanged, and the hashes we write
work in Dovecot.

SCRAM keys (``{SCRAM-SHA-256}`` and ``{SCRAM-SHA-1}``, Dovecot's
``iter,salt,StoredKey,ServerKey``) verify a plaintext password too, and give the SCRAM
mechanisms their credentials (``scram_credentials_of``, popbox.auth.scram).

Argon2 comes from argon2-cffi, bcrypt from bcrypt, the SHA-crypt and MD5-crypt
families from the system's libxcrypt (``popbox.auth.libcrypt``, without the GIL) with
libpass (imported as ``passlib``) where that is missing, and the LDAP-style ``{SHA512}`` /
``{SSHA512}`` digests from hashlib. Every comparison of secrets is constant-time
(the libraries' own, or ``hmac.compare_digest``). A stored value we cannot use never
verifies; its scheme is logged once per process, not once per login attempt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

import argon2
import bcrypt
from argon2.exceptions import VerificationError
from passlib.exc import PasswordSizeError
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt

from popbox.auth import libcrypt
from popbox.auth.base import ScramCredentials
from popbox.auth.scram import (
    DEFAULT_SCRAM_ITERATIONS,
    derive_credentials,
    make_scram_key,
    parse_scram_key,
    plain_salt,
    verify_scram_key,
)

__all__ = [
    "DEFAULT_COST",
    "DEFAULT_SCHEME",
    "HASHABLE_SCHEMES",
    "HashCost",
    "cost_signature",
    "hash_like",
    "hash_password",
    "is_plaintext",
    "normalize_scheme",
    "plaintext_of",
    "problem_with",
    "scram_credentials_of",
    "scram_iterations_of",
    "verify_password",
]

log = logging.getLogger(__name__)

# Argon2id is the winner of the Password Hashing Competition and RFC 9106's first
# recommendation; it is what `popbox user add` writes unless told otherwise.
DEFAULT_SCHEME: Final = "ARGON2ID"

# bcrypt reads at most 72 bytes of password (the Blowfish key schedule); longer
# passwords are truncated by every implementation, including Dovecot's.
BCRYPT_MAX_PASSWORD: Final = 72

# The longest password the crypt family hashes (passlib's cap, kept for the C path):
# SHA-crypt's work grows with the password's length, so an endless one is a DoS.
MAX_CRYPT_PASSWORD: Final = 4096

# Dovecot's SSHA* schemes salt with 4 random bytes; we do the same so that hashes we
# write look like the ones doveadm writes.
DIGEST_SALT_BYTES: Final = 4


@dataclass(frozen=True, slots=True)
class HashCost:
    """How expensive newly written hashes are. Verification reads cost from the hash."""

    # OWASP's Password Storage Cheat Sheet minimum for Argon2id: 19 MiB, 2 passes, 1
    # lane. A login then stays well under the auth failure delay, and the concurrent
    # verifications of the hashing threads need a fraction of the memory Dovecot's
    # m=65536,t=3 would (docs/performance.md, "Measured costs behind the code").
    # Dovecot's hashes still verify.
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19456
    argon2_parallelism: int = 1
    # OWASP's minimum work factor for bcrypt. Dovecot writes 5, which is too cheap
    # against offline guessing today.
    bcrypt_rounds: int = 10
    # Dovecot (and glibc) default to 5000 rounds; 100,000 puts SHA-crypt in line with
    # the cost of the other schemes.
    sha_crypt_rounds: int = 100_000
    # Dovecot's default and RFC 7677's floor. Unlike the others, SCRAM's count is sent
    # to every client, which computes it at each login; the server computes it only
    # for a USER/PASS or PLAIN login.
    scram_iterations: int = DEFAULT_SCRAM_ITERATIONS


DEFAULT_COST: Final = HashCost()

# Dovecot's scheme aliases (see `doveadm pw -l`): one canonical name per algorithm.
_ALIASES: Final[dict[str, str]] = {
    "BCRYPT": "BLF-CRYPT",
    "CLEAR": "PLAIN",
    "CLEARTEXT": "PLAIN",
    "MD5": "MD5-CRYPT",
    "SHA1": "SHA",
}

# LDAP-style digests: base64 by default, hex with a ``.HEX`` suffix; the salted ones
# append the salt to the digest.
_DIGESTS: Final[dict[str, tuple[str, bool]]] = {
    "SHA": ("sha1", False),
    "SSHA": ("sha1", True),
    "SHA256": ("sha256", False),
    "SSHA256": ("sha256", True),
    "SHA512": ("sha512", False),
    "SSHA512": ("sha512", True),
}

_CRYPT_FAMILY: Final = frozenset(
    {"ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT"}
)
# SCRAM keys (RFC 5802 section 3) in Dovecot's iter,salt,StoredKey,ServerKey form.
_SCRAM: Final = frozenset({"SCRAM-SHA-256", "SCRAM-SHA-1"})
# Schemes that store raw bytes and so accept Dovecot's .B64 / .HEX encoding suffix.
_ENCODABLE: Final = frozenset({"PLAIN", *_DIGESTS})

HASHABLE_SCHEMES: Final = frozenset(_CRYPT_FAMILY | _ENCODABLE | _SCRAM)

_ARGON2_TYPES: Final = {"ARGON2ID": argon2.Type.ID, "ARGON2I": argon2.Type.I}
_ARGON2_PREFIX: Final = {"ARGON2ID": "$argon2id$", "ARGON2I": "$argon2i$"}
_PASSLIB: Final = {
    "SHA512-CRYPT": sha512_crypt,
    "SHA256-CRYPT": sha256_crypt,
    "MD5-CRYPT": md5_crypt,
    "DES-CRYPT": des_crypt,
}
# $2x$ marks hashes made by the 2011 crypt_blowfish sign-extension bug; they cannot
# be verified correctly, so they never verify.
_BCRYPT_PREFIXES: Final = ("$2a$", "$2b$", "$2y$")
_DES_ALPHABET: Final = frozenset("./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class _Stored:
    scheme: str  # canonical algorithm, CRYPT already resolved to the real one
    encoding: str  # "" for crypt-family; "B64" or "HEX" for PLAIN and digests
    data: str  # what follows the {SCHEME} prefix


def normalize_scheme(name: str) -> str:
    """The canonical name of a scheme we can write (``bcrypt`` -> ``BLF-CRYPT``).

    Raises ValueError for a scheme we cannot write new hashes in.
    """
    base, dot, encoding = name.strip().upper().partition(".")
    base = _ALIASES.get(base, base)
    if base not in HASHABLE_SCHEMES or (dot and base not in _ENCODABLE):
        raise ValueError(f"unknown password scheme {name!r}")
    if dot:
        if encoding not in ("B64", "BASE64", "HEX"):
            raise ValueError(f"unknown encoding {encoding!r} in password scheme {name!r}")
        return f"{base}.{'HEX' if encoding == 'HEX' else 'B64'}"
    return base


def _detect_crypt(data: str) -> str | None:
    """The algorithm of a crypt(3)-style hash, as Dovecot's CRYPT scheme sees it."""
    for scheme, prefix in _ARGON2_PREFIX.items():
        if data.startswith(prefix):
            return scheme
    if data.startswith(_BCRYPT_PREFIXES):
        return "BLF-CRYPT"
    for prefix, scheme in (("$6$", "SHA512-CRYPT"), ("$5$", "SHA256-CRYPT"), ("$1$", "MD5-CRYPT")):
        if data.startswith(prefix):
            return scheme
    if len(data) == 13 and set(data) <= _DES_ALPHABET:
        return "DES-CRYPT"
    return None


def _parse(stored: str) -> _Stored | str:
    """Split a stored password into scheme and data, or say why it is unusable."""
    if stored.startswith("{") and "}" in stored:
        label, _, data = stored[1:].partition("}")
        base, dot, encoding = label.upper().partition(".")
        base = _ALIASES.get(base, base)
    else:
        label, base, dot, encoding, data = "CRYPT", "CRYPT", "", "", stored
    if not data:
        return "empty password field (login disabled)"
    if base == "CRYPT" and not dot:
        if data.startswith(("!", "*")):
            return "locked password (starts with '!' or '*')"
        detected = _detect_crypt(data)
        if detected is None:
            return "unsupported CRYPT hash format"
        return _Stored(detected, "", data)
    if base in _ENCODABLE:
        if not dot:
            return _Stored(base, "B64" if base in _DIGESTS else "", data)
        if encoding in ("B64", "BASE64", "HEX"):
            return _Stored(base, "HEX" if encoding == "HEX" else "B64", data)
    elif base in _SCRAM and not dot:
        return _Stored(base, "", data)
    elif (base in _CRYPT_FAMILY or base == "DES-CRYPT") and not dot:
        if base in _ARGON2_PREFIX and not data.startswith(_ARGON2_PREFIX[base]):
            return f"{{{label}}} does not hold an {base} hash"
        return _Stored(base, "", data)
    return f"unknown password scheme {{{label}}}"


def problem_with(stored: str) -> str | None:
    """Why ``stored`` can never verify (unknown scheme, locked, empty), or None."""
    parsed = _parse(stored)
    return parsed if isinstance(parsed, str) else None


def _secret_bytes(password: str) -> bytes:
    # surrogateescape gives back the exact bytes of a password that arrived as
    # invalid UTF-8 and was decoded with surrogateescape by the protocol layer.
    return password.encode("utf-8", "surrogateescape")


def _raw(parsed: _Stored) -> bytes:
    """The bytes of a PLAIN or digest value, decoded from its B64 / HEX encoding."""
    if parsed.encoding == "HEX":
        return bytes.fromhex(parsed.data)
    if parsed.encoding == "B64":
        return base64.b64decode(parsed.data, validate=True)
    return parsed.data.encode("utf-8", "surrogateescape")


def _verify_argon2(secret: bytes, parsed: _Stored) -> bool:
    try:
        return argon2.PasswordHasher().verify(parsed.data, secret)
    except VerificationError:  # the mismatch case (VerifyMismatchError) included
        return False


def _verify_bcrypt(secret: bytes, parsed: _Stored) -> bool:
    # C implementations (Dovecot's, libxcrypt) stop at NUL; we hash what they would
    # hash and still refuse afterwards, so a NUL changes the answer but not the work.
    truncated = secret.split(b"\0", 1)[0][:BCRYPT_MAX_PASSWORD]
    return bcrypt.checkpw(truncated, parsed.data.encode("ascii")) and b"\0" not in secret


def _verify_passlib(secret: bytes, parsed: _Stored) -> bool:
    truncated = secret.split(b"\0", 1)[0]  # C and passlib stop at NUL; see _verify_bcrypt
    if len(truncated) > MAX_CRYPT_PASSWORD:
        # A DoS guard (passlib's own cap): no stored hash can match it, and it is the
        # client's input that is wrong, not the hash, so nothing is logged.
        return False
    computed = libcrypt.crypt(truncated, parsed.data)
    if computed is not None:
        ok = hmac.compare_digest(computed, parsed.data.encode("ascii"))
    else:
        try:
            ok = bool(_PASSLIB[parsed.scheme].verify(truncated, parsed.data))
        except PasswordSizeError:
            return False
    return ok and b"\0" not in secret


def _verify_digest(secret: bytes, parsed: _Stored) -> bool:
    algorithm, salted = _DIGESTS[parsed.scheme]
    raw = _raw(parsed)
    size = hashlib.new(algorithm).digest_size
    if len(raw) < size or (not salted and len(raw) != size):
        raise ValueError(f"{parsed.scheme} value has the wrong length")
    digest = hashlib.new(algorithm, secret + raw[size:]).digest()
    return hmac.compare_digest(digest, raw[:size])


def _verify_plain(secret: bytes, parsed: _Stored) -> bool:
    # compare_digest returns early on a length mismatch; comparing fixed-size digests
    # keeps the stored password's length out of the timing too.
    stored = hashlib.sha256(_raw(parsed)).digest()
    return hmac.compare_digest(stored, hashlib.sha256(secret).digest())


def _verify_scram(secret: bytes, parsed: _Stored) -> bool:
    password = secret.decode("utf-8", "surrogateescape")
    return verify_scram_key(password, parsed.data, parsed.scheme)


_VERIFIERS: Final[dict[str, Callable[[bytes, _Stored], bool]]] = {
    "ARGON2ID": _verify_argon2,
    "ARGON2I": _verify_argon2,
    "BLF-CRYPT": _verify_bcrypt,
    **dict.fromkeys(_PASSLIB, _verify_passlib),
    **dict.fromkeys(_DIGESTS, _verify_digest),
    "PLAIN": _verify_plain,
    **dict.fromkeys(_SCRAM, _verify_scram),
}

_logged: set[str] = set()
_logged_lock = threading.Lock()


def _log_once(problem: str) -> None:
    with _logged_lock:
        if problem in _logged:
            return
        _logged.add(problem)
    log.warning("password never verifies: %s (logged once)", problem)


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored``; False for a mismatch or an unusable hash.

    Slow by design for the crypt family: call it off the event loop.
    """
    parsed = _parse(stored)
    if isinstance(parsed, str):
        _log_once(parsed)
        return False
    try:
        return _VERIFIERS[parsed.scheme](_secret_bytes(password), parsed)
    except (ValueError, binascii.Error) as exc:
        # A malformed hash (bad base64, a truncated bcrypt salt): the libraries say so
        # with ValueError (argon2's InvalidHashError and passlib's errors included).
        _log_once(f"malformed {parsed.scheme} hash ({type(exc).__name__})")
        return False


def _encode(raw: bytes, encoding: str) -> str:
    return raw.hex() if encoding == "HEX" else base64.b64encode(raw).decode("ascii")


def hash_password(
    password: str, scheme: str = DEFAULT_SCHEME, *, cost: HashCost = DEFAULT_COST
) -> str:
    """Hash ``password`` as ``{SCHEME}...``, the way Dovecot writes that scheme.

    Raises ValueError for a scheme we cannot write, and for a bcrypt password longer
    than 72 bytes (bcrypt would silently ignore the rest; refuse rather than mislead).
    """
    canonical = normalize_scheme(scheme)
    base, _, encoding = canonical.partition(".")
    secret = _secret_bytes(password)
    if base in _ARGON2_TYPES:
        hasher = argon2.PasswordHasher(
            time_cost=cost.argon2_time_cost,
            memory_cost=cost.argon2_memory_kib,
            parallelism=cost.argon2_parallelism,
            type=_ARGON2_TYPES[base],
        )
        return f"{{{base}}}{hasher.hash(secret)}"
    if base == "BLF-CRYPT":
        if len(secret) > BCRYPT_MAX_PASSWORD or b"\0" in secret:
            raise ValueError("BLF-CRYPT takes at most 72 bytes and no NUL; use ARGON2ID")
        hashed = bcrypt.hashpw(secret, bcrypt.gensalt(cost.bcrypt_rounds)).decode("ascii")
        # $2b$ and $2y$ are the same algorithm; $2y$ is what Dovecot and PHP write and
        # what older libxcrypt versions know.
        return "{BLF-CRYPT}$2y$" + hashed[4:]
    if base in _PASSLIB:
        if b"\0" in secret:
            raise ValueError(f"{base} passwords cannot contain NUL")
        handler = _PASSLIB[base]
        if base != "MD5-CRYPT":
            handler = handler.using(rounds=cost.sha_crypt_rounds)
        return f"{{{base}}}{handler.hash(secret)}"
    if base in _SCRAM:
        return f"{{{base}}}{make_scram_key(password, base, cost.scram_iterations)}"
    if base in _DIGESTS:
        algorithm, salted = _DIGESTS[base]
        salt = secrets.token_bytes(DIGEST_SALT_BYTES) if salted else b""
        raw = hashlib.new(algorithm, secret + salt).digest() + salt
        return f"{{{canonical}}}{_encode(raw, encoding or 'B64')}"
    # PLAIN: stored as it is, unless an encoding was asked for.
    if encoding:
        return f"{{{canonical}}}{_encode(secret, encoding)}"
    return "{PLAIN}" + password


def _cost_of(parsed: _Stored) -> tuple[HashCost, str]:
    """The cost parameters of an existing hash, and a label for them."""
    if parsed.scheme in _ARGON2_TYPES:
        params = argon2.extract_parameters(parsed.data)
        cost = replace(
            DEFAULT_COST,
            argon2_time_cost=params.time_cost,
            argon2_memory_kib=params.memory_cost,
            argon2_parallelism=params.parallelism,
        )
        label = f"m={params.memory_cost},t={params.time_cost},p={params.parallelism}"
        return cost, label
    if parsed.scheme == "BLF-CRYPT":
        rounds = int(parsed.data[4:6])
        return replace(DEFAULT_COST, bcrypt_rounds=rounds), f"rounds={rounds}"
    if parsed.scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        rounds = _PASSLIB[parsed.scheme].from_string(parsed.data).rounds
        return replace(DEFAULT_COST, sha_crypt_rounds=rounds), f"rounds={rounds}"
    if parsed.scheme in _SCRAM:
        iterations = parse_scram_key(parsed.data, parsed.scheme).iterations
        return replace(DEFAULT_COST, scram_iterations=iterations), f"i={iterations}"
    return DEFAULT_COST, ""


def cost_signature(stored: str) -> str | None:
    """Scheme and cost of a stored hash (``ARGON2ID m=65536,t=3,p=1``), None if unusable.

    Two hashes with the same signature take the same time to verify.
    """
    parsed = _parse(stored)
    if isinstance(parsed, str):
        return None
    try:
        _, label = _cost_of(parsed)
    except (ValueError, binascii.Error):
        return None
    return f"{parsed.scheme} {label}".rstrip()


def hash_like(password: str, stored: str) -> str:
    """Hash ``password`` with the scheme and cost of ``stored``.

    For the dummy hash that unknown users are checked against: it must cost what a
    real user's hash costs, whatever parameters the passwd file was written with.
    Falls back to the default scheme and cost when ``stored`` is unusable.
    """
    parsed = _parse(stored)
    if isinstance(parsed, str):
        return hash_password(password)
    if parsed.scheme == "DES-CRYPT":  # legacy: verifiable, but not offered for new hashes
        return "{CRYPT}" + str(des_crypt.hash(password))
    try:
        cost, _ = _cost_of(parsed)
    except (ValueError, binascii.Error):
        return hash_password(password)
    scheme = parsed.scheme + (f".{parsed.encoding}" if parsed.encoding == "HEX" else "")
    return hash_password(password, scheme, cost=cost)


def is_plaintext(stored: str) -> bool:
    """True if ``stored`` keeps the password itself ({PLAIN} and its aliases), for APOP."""
    parsed = _parse(stored)
    return not isinstance(parsed, str) and parsed.scheme == "PLAIN"


def plaintext_of(stored: str) -> str | None:
    """The password kept in a {PLAIN} value, or None for a hash or a malformed value."""
    parsed = _parse(stored)
    if isinstance(parsed, str) or parsed.scheme != "PLAIN":
        return None
    try:
        return _raw(parsed).decode("utf-8", "surrogateescape")
    except (ValueError, binascii.Error):
        return None


def scram_iterations_of(stored: str, hash_name: str) -> int | None:
    """The iteration count of a stored ``{hash_name}`` key; None for anything else."""
    parsed = _parse(stored)
    if isinstance(parsed, str) or parsed.scheme != hash_name:
        return None
    try:
        return parse_scram_key(parsed.data, hash_name).iterations
    except ValueError:
        return None


def scram_credentials_of(
    stored: str, hash_name: str, *, username: str, iterations: int
) -> ScramCredentials | str:
    """The SCRAM credentials ``stored`` gives for ``hash_name``, or why it gives none.

    A ``{hash_name}`` key gives its own; a {PLAIN} password keys derived with
    ``iterations`` and a salt that stays the same for ``username``; any other hash
    (argon2, bcrypt, crypt, a SCRAM key of the other hash) none at all. Slow for
    {PLAIN} (a PBKDF2 of ``iterations``): call it off the event loop.
    """
    parsed = _parse(stored)
    if isinstance(parsed, str):
        return parsed
    if parsed.scheme == hash_name:
        try:
            return parse_scram_key(parsed.data, hash_name)
        except ValueError as exc:
            _log_once(f"malformed {hash_name} key ({exc})")
            return f"malformed {hash_name} key"
    if parsed.scheme == "PLAIN":
        password = plaintext_of(stored)
        if password is None:
            return "malformed {PLAIN} value"
        salt = plain_salt(username, hash_name)
        try:
            return derive_credentials(password, hash_name, salt=salt, iterations=iterations)
        except ValueError as exc:
            return str(exc)
    return (
        f"the stored {parsed.scheme} hash gives no SCRAM keys "
        f"(store {{{hash_name}}} keys or a {{PLAIN}} password for SCRAM logins)"
    )
