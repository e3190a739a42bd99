"""Typed settings from TOML, validated once at start; errors name the key and the problem.

Every limit has a named default here with the reason for its value; the TOML file can
override any of them. Relative paths are resolved against the directory of the config
file (or the working directory for the embedded default).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from popbox.config_archive import ArchiveSettings, WebSettings
from popbox.config_mailbox import (
    MailboxSettings,
    check_login_separators,
)
from popbox.config_oauth import OAuthServerSettings
from popbox.config_scale import PostgresSettings, check_trusted_proxies
from popbox.errors import ConfigError
from popbox.proto import MAX_AUTH_FAILURES, MAX_BAD_COMMANDS, MAX_COMMAND_LINE, MAX_SASL_LINE
from popbox.store.location import LocationTemplate, parse_location

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_MECHANISMS",
    "SASL_MECHANISMS",
    "AuthSettings",
    "Config",
    "LimitSettings",
    "LmtpSettings",
    "MailboxSettings",
    "OAuthServerSettings",
    "Pop3Settings",
    "QuotaSettings",
    "StorageSettings",
    "TlsSettings",
    "check_login_separators",
    "load_config",
    "parse_listen",
]

DEFAULT_DATA_DIR: Final = "popbox-data"
# The embedded default (no config file) keeps an archive of everything and serves its
# web page on loopback: the whole of popbox, tried out with one command.
EMBEDDED_DEFAULT: Final[dict[str, Any]] = {
    "archive": {"keep": ["delivered", "collected", "disposition"]},
    "web": {"enabled": True},
}
# The side file of app passwords and APOP secrets sits beside the passwd file.
APP_PASSWORDS_SUFFIX: Final = ".app-passwords"

# The protocol limits are defined once, with their reasons, in the protocol core.
# RFC 1939 section 3: the autologout timer must be at least 10 minutes.
IDLE_TIMEOUT_TRANSACTION: Final = 600.0
# Before login a client has no business idling; Dovecot's login processes use 60s-3min.
IDLE_TIMEOUT_LOGIN: Final = 60.0
# Dovecot's auth_failure_delay: slows down password guessing on one connection.
AUTH_FAILURE_DELAY: Final = 2.0
# Dovecot's mail_max_userip_connections default is 10; per IP we allow more (NAT).
MAX_CONNECTIONS_PER_IP: Final = 100
# Dovecot's auth_penalty caps the per-IP delay (2, 4, 8 ... seconds) at 15 seconds:
# long enough to make guessing from one address slow, short enough for a typo.
AUTH_PENALTY_MAX: Final = 15.0
# Dovecot's mail_max_userip_connections default; counted per user here, because only
# someone who knows the password can take a slot, so strangers cannot lock a user out.
MAX_SESSIONS_PER_USER: Final = 10
# Dovecot's default_client_limit (1,000 clients per login process): connections that
# have not logged in cost memory and hashing but give nothing back.
MAX_LOGIN_SESSIONS: Final = 1000
# A TLS handshake that has not finished in this time is a stalled or hostile client.
TLS_HANDSHAKE_TIMEOUT: Final = 30.0
# On SIGTERM, sessions get this long to QUIT before they are dropped (uncommitted).
SHUTDOWN_GRACE: Final = 10.0
# Postfix's message_size_limit default (10 MB) is small for today's attachments;
# Dovecot's LMTP has no limit by default. 100 MiB keeps a runaway sender bounded.
MAX_MESSAGE_SIZE: Final = 100 * 1024 * 1024

log = logging.getLogger(__name__)

# RFC 5321 section 4.5.3.1.8 asks for at least 100 recipients per transaction;
# Postfix sends at most lmtp_destination_recipient_limit (50) at a time anyway.
LMTP_MAX_RECIPIENTS: Final = 1000
# RFC 5321 section 4.5.3.2.7: a server waits at least 5 minutes for the next command.
LMTP_TIMEOUT: Final = 300.0
# aiosmtpd's default (1001, RFC 5321's text line limit) would refuse mail with long
# lines, which Dovecot's LMTP takes; this bound only keeps one line from eating memory.
LMTP_MAX_LINE_LENGTH: Final = 1024 * 1024


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into host and port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{value!r} has no host")
    return host, port


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_listen(values: list[str]) -> list[str]:
    for value in values:
        parse_listen(value)
    return values


def _check_proxy_listeners(value: bool | list[str], listeners: list[str]) -> None:
    if isinstance(value, list):
        unknown = [entry for entry in value if entry not in listeners]
        if unknown:
            raise ValueError(f"proxy_protocol names {', '.join(unknown)}, which is not a listener")


class Pop3Settings(_Section):
    """The POP3 listeners and what they offer."""

    listen: list[str] = ["127.0.0.1:1110"]
    """Plain listeners (STLS offered when TLS is configured)."""
    tls_listen: list[str] = ["127.0.0.1:1995"]
    """Implicit-TLS listeners (RFC 8314, port 995 style)."""
    plaintext_auth: Literal["never", "loopback", "always"] = "loopback"
    """Where passwords may cross an unencrypted connection."""
    apop: bool = False
    """APOP needs plaintext-equivalent secrets, so it is off unless asked for."""
    expire: str = "NEVER"
    """Kept for older configs: a number of days here is ``mailbox.retention_days``
    (which EXPIRE in CAPA reports, and the sweeper enforces)."""
    implementation: str = "popbox"
    workers: int = Field(default=1, ge=1, le=256)
    """Worker processes sharing the listeners."""
    proxy_protocol: bool | list[str] = False
    """Expect a PROXY protocol header (HAProxy) from ``trusted_proxies``: ``true`` on
    every listener, or a list of the ``listen``/``tls_listen`` entries that expect it."""
    trusted_proxies: list[str] = []
    """The load balancers' addresses or networks. On a PROXY listener their
    connections must start with the header; anyone else's may not send one."""

    _listen = field_validator("listen", "tls_listen")(_check_listen)
    _trusted = field_validator("trusted_proxies")(check_trusted_proxies)

    def proxied(self, listen: str) -> bool:
        """Whether the listener ``listen`` (an entry of listen or tls_listen) expects
        PROXY headers from the trusted proxies."""
        if isinstance(self.proxy_protocol, bool):
            return self.proxy_protocol
        return listen in self.proxy_protocol

    @model_validator(mode="after")
    def _check_proxy(self) -> Pop3Settings:
        _check_proxy_listeners(self.proxy_protocol, self.listen + self.tls_listen)
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies (the load balancers)")
        return self

    @field_validator("implementation")
    @classmethod
    def _check_implementation(cls, value: str) -> str:
        # It goes on the wire in CAPA's IMPLEMENTATION line as one token.
        if not value or not value.isascii() or not value.isprintable() or " " in value:
            raise ValueError("must be printable ASCII without spaces")
        return value

    @field_validator("expire")
    @classmethod
    def _check_expire(cls, value: str) -> str:
        if value != "NEVER" and not value.isdigit():
            raise ValueError("must be a number of days or NEVER")
        return value


class TlsSettings(_Section):
    """The server certificate. Missing files are generated in the embedded default."""

    cert: Path | None = None
    key: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


class LimitSettings(_Section):
    """Every bound on what a client may do; defaults carry their reason in config.py."""

    max_command_line: int = Field(default=MAX_COMMAND_LINE, ge=255)
    max_sasl_line: int = Field(default=MAX_SASL_LINE, ge=255)
    max_bad_commands: int = Field(default=MAX_BAD_COMMANDS, ge=1)
    idle_timeout: float = Field(default=IDLE_TIMEOUT_TRANSACTION, ge=600.0)
    login_timeout: float = Field(default=IDLE_TIMEOUT_LOGIN, gt=0)
    auth_failure_delay: float = Field(default=AUTH_FAILURE_DELAY, ge=0)
    max_auth_failures: int = Field(default=MAX_AUTH_FAILURES, ge=1)
    max_connections_per_ip: int = Field(default=MAX_CONNECTIONS_PER_IP, ge=1)
    auth_penalty_max: float = Field(default=AUTH_PENALTY_MAX, ge=0)
    """Cap of the per-IP delay before each login after failures; 0 turns it off."""
    max_sessions_per_user: int = Field(default=MAX_SESSIONS_PER_USER, ge=1)
    """Sessions past the password check per user (logging in or logged in)."""
    max_login_sessions: int = Field(default=MAX_LOGIN_SESSIONS, ge=1)
    """Connections not logged in yet, over the whole service (per worker)."""
    tls_handshake_timeout: float = Field(default=TLS_HANDSHAKE_TIMEOUT, gt=0)
    shutdown_grace: float = Field(default=SHUTDOWN_GRACE, ge=0)


# The SASL mechanisms popbox can offer: SCRAM (RFC 5802, RFC 7677; popbox.net.scram),
# bearer tokens (RFC 7628 and Google's XOAUTH2; popbox.net.bearer, with [auth.oauth])
# and PLAIN and LOGIN, which the protocol core runs.
SASL_MECHANISMS: Final = (
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-1",
    "OAUTHBEARER",
    "XOAUTH2",
    "PLAIN",
    "LOGIN",
)
BEARER_MECHANISMS: Final = ("OAUTHBEARER", "XOAUTH2")
# SCRAM-SHA-256 first, bound to the TLS channel where there is one; SHA-1 only for
# clients too old for SHA-256 (RFC 7677 section 1), so off unless asked for.
# With [auth.oauth], OAUTHBEARER and XOAUTH2 join them before PLAIN.
DEFAULT_MECHANISMS: Final = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN", "LOGIN")


class AuthSettings(_Section):
    backend: Literal["passwd-file", "postgresql"] = "passwd-file"
    """Where users are: ``passwd_file``, or PostgreSQL (``[postgresql]``)."""
    passwd_file: Path = Path(DEFAULT_DATA_DIR) / "passwd"
    """A Dovecot-format passwd file: ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra``."""
    default_scheme: Literal[
        "ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "SCRAM-SHA-256", "SCRAM-SHA-1"
    ] = "ARGON2ID"
    mechanisms: list[str] = list(DEFAULT_MECHANISMS)
    """The SASL mechanisms offered, in the order CAPA and AUTH list them. Each is
    listed only where it may run: PLAIN, LOGIN, OAUTHBEARER and XOAUTH2 where
    plaintext logins are allowed, ``-PLUS`` ones inside TLS. Left unset, OAUTHBEARER
    and XOAUTH2 are added before PLAIN when ``[auth.oauth]`` is set."""
    hash_threads: int = Field(default=0, ge=0, le=32)
    """Threads per worker process that verify passwords; 0 means as many as Python's
    default executor starts (the cores plus four, at most 32)."""
    oauth: OAuthServerSettings | None = None
    """Bearer-token logins (OAUTHBEARER, XOAUTH2); off unless the table is present."""

    @field_validator("mechanisms")
    @classmethod
    def _check_mechanisms(cls, value: list[str]) -> list[str]:
        names = [name.strip().upper() for name in value]
        for name in names:
            if name not in SASL_MECHANISMS:
                raise ValueError(
                    f"unknown SASL mechanism {name!r} (one of {', '.join(SASL_MECHANISMS)})"
                )
        if len(set(names)) != len(names):
            raise ValueError("a mechanism is listed twice")
        return names

    @model_validator(mode="after")
    def _bearer_mechanisms(self) -> AuthSettings:
        listed = [name for name in self.mechanisms if name in BEARER_MECHANISMS]
        if self.oauth is None:
            if listed:
                raise ValueError(f"mechanisms: {', '.join(listed)} needs an [auth.oauth] table")
        elif "mechanisms" not in self.model_fields_set and not listed:
            at = self.mechanisms.index("PLAIN")
            self.mechanisms[at:at] = list(BEARER_MECHANISMS)
        return self

    app_passwords_file: Path | None = None
    """The side file of app passwords and APOP secrets (auth.credentials); unset:
    ``passwd_file`` with ``.app-passwords`` added to its name."""

    def credentials_path(self) -> Path:
        """Where the app passwords and APOP secrets are."""
        if self.app_passwords_file is not None:
            return self.app_passwords_file
        return self.passwd_file.with_name(self.passwd_file.name + APP_PASSWORDS_SUFFIX)


class StorageSettings(_Section):
    backend: Literal["maildir", "postgresql"] = "maildir"
    """Where mail lives: Maildirs on this machine, or PostgreSQL (``[postgresql]``)
    for nodes that share it (docs/scale-out.md)."""
    maildir_root: Path = Path(DEFAULT_DATA_DIR) / "mail"
    """Each user's Maildir is ``maildir_root/USER`` (with cur/, new/, tmp/), unless
    ``mail_location`` or the user's own ``mail`` field says otherwise."""
    mail_location: str = ""
    """Dovecot's ``mail_location``: ``maildir:/var/vmail/%d/%n/Maildir``,
    ``maildir:~/Maildir`` (store.location); "" keeps ``maildir_root/USER``."""
    save_crlf: bool = True
    """Store delivered mail with CRLF line ends (Dovecot's ``mail_save_crlf``): RETR then
    sends the file as it is (sendfile). ``false`` keeps the line ends as received."""
    moving_from: Literal["", "maildir", "postgresql"] = ""
    """While ``popbox migrate`` moves mailboxes into ``backend`` from this other store:
    users not moved yet are served from it, users being moved get [IN-USE] and LMTP
    451 for a moment, moved users are served from ``backend`` (docs/migration.md).
    "" when no move is under way."""

    @model_validator(mode="after")
    def _check_moving_from(self) -> StorageSettings:
        if self.moving_from == self.backend:
            raise ValueError("moving_from must name the other store than backend")
        return self

    @field_validator("mail_location")
    @classmethod
    def _check_location(cls, value: str) -> str:
        if value:
            # The error names the key already; the message need not say it twice.
            parse_location(value, source="the mail location")
        return value

    def location_template(self) -> LocationTemplate | None:
        """``mail_location`` parsed; None when unset (``maildir_root/USER``)."""
        if not self.mail_location:
            return None
        return parse_location(self.mail_location, source="storage.mail_location")


class QuotaSettings(_Section):
    """Defaults for every user; a passwd-file extra field overrides them per user."""

    messages: int = Field(default=0, ge=0)
    """Most messages a maildrop may hold; 0 means no limit."""
    octets: int = Field(default=0, ge=0)
    """Most octets a maildrop may hold; 0 means no limit."""
    over_quota: Literal["temporary", "permanent"] = "temporary"
    """Whether a full mailbox makes the MTA retry (452 4.2.2) or bounce (552 5.2.2)."""


class LmtpSettings(_Section):
    enabled: bool = True
    listen: list[str] = ["127.0.0.1:2424"]
    socket: Path | None = None
    """A unix socket to listen on as well (for Postfix's lmtp:unix:...)."""
    domains: list[str] = []
    """Domains whose recipients are ours; user@domain maps to user."""
    recipient_delimiter: str = "+"
    lowercase_local_part: bool = True
    max_message_size: int = Field(default=MAX_MESSAGE_SIZE, gt=0)
    max_recipients: int = Field(default=LMTP_MAX_RECIPIENTS, ge=1)
    timeout: float = Field(default=LMTP_TIMEOUT, gt=0)
    max_line_length: int = Field(default=LMTP_MAX_LINE_LENGTH, ge=1000)
    proxy_protocol: bool = False
    """Expect a PROXY protocol header from ``trusted_proxies`` on the TCP listeners."""
    trusted_proxies: list[str] = []

    _listen = field_validator("listen")(_check_listen)
    _trusted = field_validator("trusted_proxies")(check_trusted_proxies)

    @model_validator(mode="after")
    def _check_proxy(self) -> LmtpSettings:
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies (the load balancers)")
        return self


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(_Section):
    """The whole of popbox's server-side configuration."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    hostname: str = "localhost"
    pop3: Pop3Settings = Pop3Settings()
    tls: TlsSettings = TlsSettings()
    limits: LimitSettings = LimitSettings()
    auth: AuthSettings = AuthSettings()
    storage: StorageSettings = StorageSettings()
    quota: QuotaSettings = QuotaSettings()
    lmtp: LmtpSettings = LmtpSettings()
    mailbox: MailboxSettings = MailboxSettings()
    archive: ArchiveSettings = ArchiveSettings()
    web: WebSettings = WebSettings()
    log: LogSettings = LogSettings()
    postgresql: PostgresSettings | None = None
    """The database of ``storage.backend`` or ``auth.backend`` = "postgresql"."""
    fetch: dict[str, Any] = {}
    """The collector's own settings; validated by popbox.collector when it runs."""
    user: str | None = None
    """Unprivileged user to switch to after binding listeners when started as root."""
    group: str | None = None

    @model_validator(mode="after")
    def _expire_is_retention(self) -> Config:
        # pop3.expire once only printed EXPIRE in CAPA; it now means the retention
        # it promised, and may not contradict mailbox.retention_days.
        if self.pop3.expire == "NEVER":
            return self
        days = int(self.pop3.expire)
        if self.mailbox.retention_days is None:
            mailbox = self.mailbox.model_copy(update={"retention_days": days})
            object.__setattr__(self, "mailbox", mailbox)
        elif self.mailbox.retention_days != days:
            raise ValueError(
                "pop3.expire and mailbox.retention_days disagree; set only retention_days"
            )
        return self

    @model_validator(mode="after")
    def _postgresql_is_set(self) -> Config:
        if self.postgresql is None:
            for key, backend in (
                ("storage.backend", self.storage.backend),
                ("storage.moving_from", self.storage.moving_from),
                ("auth.backend", self.auth.backend),
                ("archive.backend", self.archive.backend),
            ):
                if backend == "postgresql":
                    raise ValueError(f'{key} = "postgresql" needs a [postgresql] table')
        return self

    @model_validator(mode="after")
    def _web_listen(self) -> Config:
        try:
            parse_listen(self.web.listen)
        except ValueError as exc:
            raise ValueError(f"web.listen: {exc}") from exc
        return self

    _base: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """The directory relative paths in the config file resolve against (the
        file's own; the working directory for the embedded default)."""
        return self._base

    def archive_path(self) -> Path:
        """Where the embedded archive keeps its index and its objects."""
        return self.archive.path or self.data_dir / "archive"

    def archive_backend(self) -> str:
        """``sqlite`` or ``postgresql``: the configured one, else the store's kind."""
        if self.archive.backend is not None:
            return self.archive.backend
        return "postgresql" if self.storage.backend == "postgresql" else "sqlite"

    def tls_cert_path(self) -> Path:
        return self.tls.cert or self.data_dir / "tls" / "cert.pem"

    def tls_key_path(self) -> Path:
        return self.tls.key or self.data_dir / "tls" / "key.pem"


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the path settings of a parsed TOML document absolute against ``base``."""
    data_dir = Path(data.get("data_dir", DEFAULT_DATA_DIR))
    if not data_dir.is_absolute():
        data_dir = base / data_dir
    data["data_dir"] = data_dir
    defaults = {
        ("auth", "passwd_file"): data_dir / "passwd",
        ("storage", "maildir_root"): data_dir / "mail",
    }
    for (section, key), default in defaults.items():
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        value = table.get(key)
        if value is None:
            table[key] = default
        elif isinstance(value, str) and not Path(value).is_absolute():
            table[key] = base / value
    auth = data.get("auth")
    oauth = auth.get("oauth") if isinstance(auth, dict) else None
    tables = {
        "tls": data.get("tls"),
        "lmtp": data.get("lmtp"),
        "auth": auth,
        "oauth": oauth,
        "archive": data.get("archive"),
    }
    for section, key in (
        ("tls", "cert"),
        ("tls", "key"),
        ("lmtp", "socket"),
        ("auth", "app_passwords_file"),
        ("oauth", "client_secret_file"),
        ("oauth", "ca_file"),
        ("archive", "path"),
    ):
        table = tables[section]
        if isinstance(table, dict) and isinstance(table.get(key), str):
            value = Path(table[key])
            table[key] = value if value.is_absolute() else base / value
    return data


def config_from_dict(data: dict[str, Any], base: Path) -> Config:
    """Validate a parsed document; raise ConfigError naming every bad key."""
    try:
        config = Config.model_validate(_resolve_paths(dict(data), base))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
    config._base = base
    return config


def load_config(path: Path | None) -> Config:
    """Load ``path``, or the embedded default (data under ./popbox-data) when None."""
    if path is None:
        return config_from_dict(EMBEDDED_DEFAULT, Path.cwd())
    try:
        with path.open("rb") as handle:
            _check_config_file_mode(path, os.fstat(handle.fileno()))
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return config_from_dict(data, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _check_config_file_mode(path: Path, info: os.stat_result) -> None:
    """Refuse a config file that someone other than its owner can rewrite.

    The config names the passwd file, the user to run as and the TLS key: whoever can
    write it can log in as anyone or read everyone's mail (as the passwd check in
    popbox.auth.passwdfile refuses a passwd file others can write).
    """
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path}: config file is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod go-w {path}"
        )
    if info.st_uid not in (0, os.geteuid()):
        # E.g. owned by the unprivileged user a root-started server drops to: a
        # compromised server could then rewrite the config it next starts with as root.
        raise ConfigError(
            f"{path}: config file is owned by uid {info.st_uid}, who could rewrite it; "
            f"it must belong to root or to the user running popbox"
        )


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str) -> bool:
    """True for a loopback peer address (plaintext_auth = "loopback").

    Asked once per connection, mostly for the same few addresses: cached.
    """
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
