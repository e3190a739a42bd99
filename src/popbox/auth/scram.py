"""SCRAM (RFC 5802, RFC 7677) without the network: stored keys and the server's exchange.

Stored keys are Dovecot's: ``{SCRAM-SHA-256}iter,salt,StoredKey,ServerKey`` (the last
three in base64), what ``doveadm pw -s SCRAM-SHA-256`` writes, so one passwd file
serves both servers. A {PLAIN} password gives keys derived at login; any other hash
(argon2, bcrypt, crypt) cannot: its user's SCRAM logins fail as a wrong password
does. Unknown users get fake credentials made from a per-process secret and the name,
so the salt and iteration count a client sees say nothing about whether a name exists
(as Cyrus does).

The exchange runs on scramp (``ScramServerExchange``); this module adds what popbox
needs around it: choosing the channel binding the client names from those the
connection has, refusing a downgrade (RFC 5802 section 6), and the GS2 authorization
identity (``a=``, a shared mailbox) that scramp's server does not take.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from scramp import ScramException, ScramMechanism
from scramp.core import ClientFirstBare, Gs2Header, ScramServer
from scramp.utils import saslprep

from popbox.auth.base import SCRAM_HASHES, ScramCredentials

__all__ = [
    "DEFAULT_SCRAM_ITERATIONS",
    "MAX_SCRAM_ITERATIONS",
    "SCRAM_SALT_BYTES",
    "ClientFirst",
    "ScramFailure",
    "ScramServerExchange",
    "derive_credentials",
    "fake_credentials",
    "format_scram_key",
    "make_scram_key",
    "parse_scram_key",
    "verify_scram_key",
]

# Dovecot's default (AUTH_SCRAM_DEFAULT_ITERATE_COUNT) and RFC 7677's floor. Every
# client sees the count before it proves anything, so keys written, keys derived from
# {PLAIN} and fakes all use the count most common in the user database.
DEFAULT_SCRAM_ITERATIONS: Final = 4096
# Dovecot's minimum; fewer is refused as a malformed key.
MIN_SCRAM_ITERATIONS: Final = 4096
# scramp's DoS guard: a count the server sends is one the client must compute, and a
# plaintext login against such a key costs the server as much.
MAX_SCRAM_ITERATIONS: Final = 10_000_000
# Dovecot writes 16 random bytes of salt; scramp refuses fewer than 12.
SCRAM_SALT_BYTES: Final = 16

_HASHES: Final[dict[str, Callable[..., hashlib._Hash]]] = {
    "SCRAM-SHA-256": hashlib.sha256,
    "SCRAM-SHA-1": hashlib.sha1,
}

# The secret behind fake credentials and the salts of keys derived from {PLAIN}: made
# once per process, before the server forks its workers (popbox.app imports this
# module first), so every worker shows a name the same salt.
_PROCESS_SECRET: Final = secrets.token_bytes(32)


def _digest(hash_name: str) -> Callable[..., hashlib._Hash]:
    try:
        return _HASHES[hash_name]
    except KeyError:
        raise ValueError(f"not a SCRAM hash: {hash_name!r} (one of {SCRAM_HASHES})") from None


def parse_scram_key(data: str, hash_name: str) -> ScramCredentials:
    """The credentials in Dovecot's ``iter,salt,StoredKey,ServerKey``; ValueError
    (saying what is wrong) for a malformed one."""
    size = _digest(hash_name)().digest_size
    fields = data.split(",")
    if len(fields) != 4:
        raise ValueError(f"{hash_name} key must be iter,salt,StoredKey,ServerKey")
    count, salt_b64, stored_b64, server_b64 = fields
    if not count.isascii() or not count.isdigit():
        raise ValueError(f"{hash_name} iteration count is not a number")
    iterations = int(count)
    if not MIN_SCRAM_ITERATIONS <= iterations <= MAX_SCRAM_ITERATIONS:
        raise ValueError(
            f"{hash_name} iteration count must be {MIN_SCRAM_ITERATIONS} to {MAX_SCRAM_ITERATIONS}"
        )
    try:
        salt = base64.b64decode(salt_b64, validate=True)
        stored_key = base64.b64decode(stored_b64, validate=True)
        server_key = base64.b64decode(server_b64, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{hash_name} key is not base64") from exc
    if len(salt) < 12:
        raise ValueError(f"{hash_name} salt is shorter than 12 bytes")
    if len(stored_key) != size or len(server_key) != size:
        raise ValueError(f"{hash_name} keys must be {size} bytes")
    return ScramCredentials(salt, iterations, stored_key, server_key)


def format_scram_key(credentials: ScramCredentials) -> str:
    """Dovecot's ``iter,salt,StoredKey,ServerKey`` (without the ``{SCHEME}``)."""
    parts = (credentials.salt, credentials.stored_key, credentials.server_key)
    encoded = (base64.b64encode(part).decode("ascii") for part in parts)
    return ",".join((str(credentials.iterations), *encoded))


def derive_credentials(
    password: str, hash_name: str, *, salt: bytes, iterations: int
) -> ScramCredentials:
    """The keys of ``password`` (SASLprep'd, RFC 5802 section 2.2, as SCRAM clients do)
    with ``salt`` and ``iterations``. ValueError for a password SASLprep prohibits."""
    _digest(hash_name)
    mechanism = ScramMechanism(hash_name)
    try:
        _, stored_key, server_key, _ = mechanism.make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
    except ScramException as exc:
        raise ValueError(f"cannot make {hash_name} keys: {exc}") from exc
    return ScramCredentials(salt, iterations, stored_key, server_key)


def make_scram_key(password: str, hash_name: str, iterations: int) -> str:
    """A new ``iter,salt,StoredKey,ServerKey`` for ``password`` with a random salt."""
    salt = secrets.token_bytes(SCRAM_SALT_BYTES)
    return format_scram_key(
        derive_credentials(password, hash_name, salt=salt, iterations=iterations)
    )


def _raw_stored_key(secret: bytes, hash_name: str, salt: bytes, iterations: int) -> bytes:
    """StoredKey of ``secret`` as it is (RFC 5802 section 3), without SASLprep: what
    Dovecot's plaintext check computes."""
    digest = _digest(hash_name)
    salted = hashlib.pbkdf2_hmac(digest().name, secret, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    return digest(client_key).digest()


def verify_scram_key(password: str, data: str, hash_name: str) -> bool:
    """Whether ``password`` made the stored key ``data`` (a USER/PASS or PLAIN login).

    The password's own bytes first, as Dovecot checks; then its SASLprep'd form when
    that differs (the keys popbox writes, and what SCRAM clients compute). Compared in
    constant time. ValueError for a malformed key.
    """
    credentials = parse_scram_key(data, hash_name)
    salt, iterations = credentials.salt, credentials.iterations
    secret = password.encode("utf-8", "surrogateescape")
    computed = _raw_stored_key(secret, hash_name, salt, iterations)
    if hmac.compare_digest(computed, credentials.stored_key):
        return True
    try:
        prepped = saslprep(password)
    except ScramException:
        return False  # a password SASLprep prohibits made no key popbox wrote
    if prepped == password:
        return False  # the same bytes: the same mismatch, not worth a second PBKDF2
    computed = _raw_stored_key(prepped.encode("utf-8"), hash_name, salt, iterations)
    return hmac.compare_digest(computed, credentials.stored_key)


def _keyed(purpose: str, hash_name: str, username: str, size: int) -> bytes:
    message = "\0".join((purpose, hash_name, username)).encode("utf-8", "surrogateescape")
    return hmac.new(_PROCESS_SECRET, message, hashlib.sha256).digest()[:size]


def plain_salt(username: str, hash_name: str) -> bytes:
    """The salt of keys derived from ``username``'s {PLAIN} password: the same at every
    login (as a stored key's is), never stored."""
    return _keyed("plain salt", hash_name, username, SCRAM_SALT_BYTES)


def fake_credentials(
    username: str, hash_name: str, *, iterations: int, problem: str
) -> ScramCredentials:
    """Credentials for a user who has none (``problem`` says why): a salt that stays
    the same for the name, keys no password gives. They cost what stored keys cost."""
    size = _digest(hash_name)().digest_size
    return ScramCredentials(
        salt=_keyed("fake salt", hash_name, username, SCRAM_SALT_BYTES),
        iterations=iterations,
        stored_key=_keyed("fake stored key", hash_name, username, size),
        server_key=_keyed("fake server key", hash_name, username, size),
        problem=problem,
    )


# -- the exchange ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFirst:
    """Who the client-first message says logs in: ``username`` (saslname-decoded and
    SASLprep'd) and ``authzid`` (the GS2 ``a=``, "" for none)."""

    username: str
    authzid: str


@dataclass(frozen=True, slots=True)
class ScramFailure:
    """The exchange failed: ``reason`` for the log, ``server_error`` the RFC 5802
    section 7 server-error-value that names it."""

    reason: str
    server_error: str = "other-error"


class _AuthzidGs2Header(Gs2Header):  # type: ignore[misc]
    """scramp's GS2 header as the client sent it, authzid included: the client's
    ``c=`` binds the whole header (RFC 5802 section 7, cbind-input)."""

    def __init__(self, parsed: Gs2Header, sent: str) -> None:
        super().__init__(parsed.gs2_char, parsed.cb_name)
        self._sent = sent

    def __str__(self) -> str:
        return self._sent


def _decode_saslname(text: str) -> str | None:
    """RFC 5802's saslname: ``=2C`` is ``,`` and ``=3D`` is ``=``; None if malformed."""
    index = text.find("=")
    while index != -1:
        if text[index : index + 3] not in ("=2C", "=3D"):
            return None
        index = text.find("=", index + 1)
    return text.replace("=2C", ",").replace("=3D", "=")


class ScramServerExchange:
    """One SCRAM exchange on the server's side, as scramp runs it, in three calls:
    ``receive_first`` (who logs in), ``server_first`` (given their credentials),
    ``receive_final`` (the proof; the server-final message to send when it holds).

    ``mechanism`` is the name the client chose (``SCRAM-SHA-256-PLUS``); ``bindings``
    the channel-binding data the connection has, by RFC 5056 name (``tls-server-end-
    point``, ``tls-unique``), empty without TLS; ``plus_offered`` whether this
    connection offers the -PLUS variant, so that a client saying it supports binding
    but believes the server does not (``y``) is refused as a downgrade.
    """

    def __init__(
        self, mechanism: str, bindings: Mapping[str, bytes], *, plus_offered: bool
    ) -> None:
        self.plus = mechanism.endswith("-PLUS")
        self.hash_name = mechanism.removesuffix("-PLUS")
        _digest(self.hash_name)
        self._mechanism = mechanism
        self._bindings = dict(bindings)
        self._plus_offered = plus_offered
        self._binding: tuple[str, bytes] | None = None
        # The client-first message without the authzid, which scramp refuses, and the
        # GS2 header as sent when it had one (the client's c= binds it).
        self._stripped = ""
        self._authz_header: str | None = None
        self._first: ClientFirst | None = None
        self._server: ScramServer | None = None
        self._problem = ""

    def receive_first(self, message: bytes) -> ClientFirst | ScramFailure:
        """Read the client-first message: the login's names, or why it is refused."""
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            return ScramFailure("client-first is not UTF-8", "invalid-encoding")
        flag, comma, rest = text.partition(",")
        authz, comma2, bare = rest.partition(",")
        if not comma or not comma2:
            return ScramFailure("client-first has no GS2 header")
        failure = self._check_binding(flag)
        if failure is not None:
            return failure
        authzid = ""
        if authz:
            decoded = _decode_saslname(authz[2:]) if authz.startswith("a=") else None
            if not decoded:
                return ScramFailure("malformed authzid in the GS2 header", "invalid-encoding")
            authzid = decoded
        try:
            username = str(ClientFirstBare(bare)["n"])
        except ScramException as exc:
            return _failure("client-first", exc)
        self._stripped = f"{flag},,{bare}"
        self._authz_header = f"{flag},{authz}," if authz else None
        self._first = ClientFirst(username, authzid)
        return self._first

    def _check_binding(self, flag: str) -> ScramFailure | None:
        """RFC 5802 section 6's rules for the gs2-cbind-flag; the binding to check."""
        if flag.startswith("p="):
            name = flag[2:]
            if not self.plus:
                return ScramFailure(
                    f"channel binding ({name}) with {self._mechanism}, which has none",
                    "channel-binding-not-supported",
                )
            if name not in self._bindings:
                return ScramFailure(
                    f"channel binding {name} is not available on this connection",
                    "unsupported-channel-binding-type",
                )
            self._binding = (name, self._bindings[name])
            return None
        if flag not in ("n", "y"):
            return ScramFailure("malformed gs2-cbind-flag")
        if self.plus:
            return ScramFailure(
                f"{self._mechanism} without channel binding ({flag})",
                "server-does-support-channel-binding",
            )
        if flag == "y" and self._plus_offered:
            # The client binds but saw no -PLUS: someone removed it from CAPA.
            return ScramFailure(
                "possible downgrade: the client supports channel binding but saw no -PLUS",
                "server-does-support-channel-binding",
            )
        return None

    def server_first(self, credentials: ScramCredentials) -> bytes | ScramFailure:
        """The server-first message for the user's ``credentials``."""
        first = self._first
        if first is None:
            raise RuntimeError("server_first before receive_first")
        expected = first.username

        def auth_fn(username: str) -> tuple[bytes, bytes, bytes, int]:
            if username != expected:  # scramp reads the name as receive_first did
                raise ValueError(f"user {username!r} is not {expected!r}")
            return (
                credentials.salt,
                credentials.stored_key,
                credentials.server_key,
                credentials.iterations,
            )

        try:
            server = ScramMechanism(self._mechanism).make_server(
                auth_fn, channel_binding=self._binding
            )
            server.set_client_first(self._stripped)
            if self._authz_header is not None:
                server.gs2_header = _AuthzidGs2Header(server.gs2_header, self._authz_header)
            reply = server.get_server_first()
        except ScramException as exc:
            return _failure("client-first", exc)
        self._server = server
        self._problem = credentials.problem
        return str(reply).encode("ascii")

    def receive_final(self, message: bytes) -> bytes | ScramFailure:
        """Check the client-final message's binding and proof: the server-final
        message (``v=``) to send, or why the login fails."""
        server, problem = self._server, self._problem
        if server is None:
            raise RuntimeError("receive_final before server_first")
        try:
            server.set_client_final(message.decode("utf-8"))
            final = str(server.get_server_final())
        except UnicodeDecodeError:
            return ScramFailure("client-final is not UTF-8", "invalid-encoding")
        except ScramException as exc:
            failure = _failure("client-final", exc)
            if problem:
                return ScramFailure(f"{problem} ({failure.reason})", failure.server_error)
            return failure
        if problem:  # no password gives fake keys; said twice to be sure
            return ScramFailure(problem, "invalid-proof")
        return final.encode("ascii")


def _failure(stage: str, exc: ScramException) -> ScramFailure:
    error = exc.server_error.value if exc.server_error is not None else "other-error"
    return ScramFailure(f"{stage}: {exc.args[0] if exc.args else exc}", error)
