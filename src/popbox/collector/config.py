"""Typed settings of the collector: the ``[fetch]`` table, its accounts and their sinks.

The collector's settings live in the same TOML file as the server's, under ``[fetch]``
and ``[[fetch.accounts]]`` (each with ``[[fetch.accounts.sinks]]``). ``popbox fetch``
validates only that table, here; errors name the key (``fetch.accounts.0.port: ...``).
Relative paths resolve against the directory of the config file; ``~`` expands.

Secrets never sit in the file itself: each secret is named by exactly one of
``*_env`` (an environment variable), ``*_file`` (a file, trailing newline stripped) or
``*_command`` (a command whose standard output is the secret), read by ``SecretSource``.
What the parts share lives in ``config_common``, the sinks' settings in
``config_sinks``; both are re-exported here.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from popbox.collector.config_common import (
    ConfigPath,
    OAuthSettings,
    Port,
    SecretSource,
    SettingsModel,
    at_most_one,
    normalise_fingerprint,
    secret_from,
)
from popbox.collector.config_sinks import (
    ArchiveSinkSettings,
    CommandSinkSettings,
    GmailSinkSettings,
    ImapSinkSettings,
    LmtpSinkSettings,
    MaildirSinkSettings,
    MboxSinkSettings,
    PopboxSinkSettings,
    SinkSettings,
    SmtpSinkSettings,
    WebhookSinkSettings,
)
from popbox.errors import ConfigError

__all__ = [
    "AccountSettings",
    "ArchiveSinkSettings",
    "CommandSinkSettings",
    "FetchSettings",
    "GmailSinkSettings",
    "HeaderRule",
    "ImapSinkSettings",
    "LmtpSinkSettings",
    "MaildirSinkSettings",
    "MboxSinkSettings",
    "OAuthSettings",
    "PopboxSinkSettings",
    "SecretSource",
    "SinkSettings",
    "SmtpSinkSettings",
    "WebhookSinkSettings",
    "fetch_settings_from_dict",
    "load_fetch_settings",
]

# XDG's state directory is where fetchmail-like tools keep "what have I seen" data.
DEFAULT_STATE_DIR: Final = "~/.local/state/popbox"
# RFC 8314 section 3.3: implicit TLS for POP3 is port 995; RFC 1939 puts POP3 on 110.
POP3S_PORT: Final = 995
POP3_PORT: Final = 110
# Four concurrent accounts keep a two-core box busy without looking like an attack.
MAX_CONCURRENT_ACCOUNTS: Final = 4
# A connect that has not finished in 30 s is a dead route, not a slow server.
CONNECT_TIMEOUT: Final = 30.0
# Per reply; RFC 1939's 10-minute server timeout bounds how long a server may think.
COMMAND_TIMEOUT: Final = 120.0
# Five tries of a temporary sink failure (with the daemon's backoff between runs) make
# a poison message; then it goes to quarantine so later messages keep flowing.
MAX_ATTEMPTS: Final = 5
# RETRs in flight: each round trip then brings 32 messages (mpop keeps up to 100 in
# flight); the commands are a few hundred octets, far below any TCP window.
MAX_IN_FLIGHT: Final = 32
# fetchmail's daemon default poll interval is 300 s.
POLL_INTERVAL: Final = 300.0
# Backoff after failures stops growing at an hour, so a fixed server is seen soon.
MAX_BACKOFF: Final = 3600.0

_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
# What may stand in a file name made from a sink label (``a--imap_x_y.json``).
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._@+-]")


# ---------------------------------------------------------------------------- accounts


class HeaderRule(SettingsModel):
    """One rule of the header filter, decided from ``TOP n 0`` before downloading."""

    header: str
    pattern: str
    """A Python regular expression searched in the (unfolded, decoded) header value."""
    action: Literal["fetch", "skip"] = "fetch"

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class AccountSettings(SettingsModel):
    """One remote POP3 mailbox and what to do with its messages."""

    name: str
    """Names the account in state, logs and ``--account``; letters, digits, ._@+-."""
    enabled: bool = True
    host: str
    port: Port | None = None
    """Default 995 for security = "tls", 110 otherwise."""
    security: Literal["tls", "starttls", "none"] = "tls"
    ca_file: ConfigPath | None = None
    """Trust these CAs instead of the system store."""
    tls_fingerprint: str | None = None
    """SHA-256 of the server certificate (hex, colons allowed). When set, the
    certificate must match it; the CA chain is then not consulted (self-signed)."""
    tls_server_name: str | None = None
    """The name the certificate must carry; default ``host``."""
    username: str
    auth: Literal["password", "oauth2"] = "password"
    auth_mechanism: Literal[
        "auto",
        "user",
        "plain",
        "login",
        "apop",
        "scram-sha-256",
        "scram-sha-1",
        "xoauth2",
        "oauthbearer",
    ] = "auto"
    """auto: SASL PLAIN if offered, else USER/PASS (for oauth2 XOAUTH2, then
    OAUTHBEARER). APOP and SCRAM are used only when asked for: a server may offer
    SCRAM for users whose stored hash cannot serve it (popbox and Dovecot do), and
    auto must not turn a working login into a failing one. ``scram-sha-256`` binds
    to the TLS channel (SCRAM-SHA-256-PLUS) whenever the server offers it; SCRAM
    never sends the password, so it needs no TLS for that."""
    password_env: str | None = None
    password_file: ConfigPath | None = None
    password_command: str | None = None
    allow_plaintext_password: bool = False
    """Permit a password over security = "none". Off: such a login is refused."""
    oauth: OAuthSettings | None = None

    delete: Literal["keep", "after_delivery", "after_days"] = "keep"
    """keep on the server (default); DELE once delivered; or DELE messages delivered
    more than ``delete_after_days`` days ago."""
    delete_after_days: int = Field(default=0, ge=0)
    max_messages_per_run: int = Field(default=0, ge=0)
    """0 = no limit."""
    max_bytes_per_run: int = Field(default=0, ge=0)
    """0 = no limit; the message that crosses the limit is still fetched whole."""
    max_message_size: int = Field(default=0, ge=0)
    """0 = no limit; bigger messages are handled per ``oversize``."""
    oversize: Literal["skip", "quarantine"] = "skip"
    filters: list[HeaderRule] = []
    """The first rule whose header matches decides; none matching -> filter_default."""
    filter_default: Literal["fetch", "skip"] = "fetch"
    max_attempts: int = Field(default=MAX_ATTEMPTS, ge=1)
    """Temporary sink failures of one message before it is quarantined."""
    uid_source: Literal["auto", "uidl", "header_hash"] = "auto"
    """auto: the server's UIDLs while they are valid and unique, else a header hash."""

    pipelining: Literal["auto", "on", "off"] = "auto"
    """auto: pipeline when the server's CAPA lists PIPELINING."""
    max_in_flight: int = Field(default=MAX_IN_FLIGHT, ge=1, le=64)
    connect_timeout: float = Field(default=CONNECT_TIMEOUT, gt=0)
    command_timeout: float = Field(default=COMMAND_TIMEOUT, gt=0)
    interval: float = Field(default=POLL_INTERVAL, gt=0)
    """Daemon mode: seconds between polls (with jitter)."""

    sinks: list[SinkSettings] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _ACCOUNT_NAME.match(value):
            raise ValueError("use 1-64 letters, digits and ._@+- (starting alphanumeric)")
        return value

    @field_validator("tls_fingerprint")
    @classmethod
    def _check_fingerprint(cls, value: str | None) -> str | None:
        return normalise_fingerprint(value)

    @model_validator(mode="after")
    def _check_account(self) -> AccountSettings:
        at_most_one("password", self.password_env, self.password_file, self.password_command)
        if self.auth == "oauth2":
            if self.oauth is None:
                raise ValueError("auth = oauth2 needs an [oauth] table")
            if self.auth_mechanism not in ("auto", "xoauth2", "oauthbearer"):
                raise ValueError("auth = oauth2 needs auth_mechanism xoauth2 or oauthbearer")
        else:
            if self.auth_mechanism in ("xoauth2", "oauthbearer"):
                raise ValueError(f"auth_mechanism {self.auth_mechanism} needs auth = oauth2")
            if self.password_source() is None:
                raise ValueError("set one of password_env, password_file, password_command")
            scram = self.auth_mechanism.startswith("scram-")
            if self.security == "none" and not self.allow_plaintext_password and not scram:
                raise ValueError(
                    'a password over security = "none" needs allow_plaintext_password = true'
                )
        if self.delete == "after_days" and self.delete_after_days < 1:
            raise ValueError('delete = "after_days" needs delete_after_days >= 1')
        labels = [sink.label for sink in self.sinks]
        if len(set(labels)) != len(labels):
            raise ValueError("two sinks have the same label; give them distinct names")
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return POP3S_PORT if self.security == "tls" else POP3_PORT

    def password_source(self) -> SecretSource | None:
        return secret_from("password", self.password_env, self.password_file, self.password_command)


class FetchSettings(SettingsModel):
    """The whole ``[fetch]`` table."""

    state_dir: ConfigPath = Path(DEFAULT_STATE_DIR)
    state_db: ConfigPath | None = None
    """Default ``state_dir/fetch.sqlite``."""
    quarantine_dir: ConfigPath | None = None
    """Default ``state_dir/quarantine``."""
    spool_dir: ConfigPath | None = None
    """Where bodies are written while they download; default ``state_dir/spool``."""
    max_concurrent_accounts: int = Field(default=MAX_CONCURRENT_ACCOUNTS, ge=1, le=256)
    jitter: float = Field(default=0.1, ge=0, le=1)
    """Daemon mode: each interval varies by up to this fraction, so polls spread out."""
    max_backoff: float = Field(default=MAX_BACKOFF, gt=0)
    accounts: list[AccountSettings] = []

    @model_validator(mode="after")
    def _check_accounts(self) -> FetchSettings:
        names = [account.name for account in self.accounts]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"account names must be unique: {', '.join(duplicates)}")
        return self

    @property
    def state_db_path(self) -> Path:
        return self.state_db or self.state_dir / "fetch.sqlite"

    @property
    def quarantine_path(self) -> Path:
        return self.quarantine_dir or self.state_dir / "quarantine"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.state_dir / "spool"

    def oauth_token_store(self, account: AccountSettings) -> Path:
        """Where the refresh token of ``account`` is stored."""
        if account.oauth is not None and account.oauth.token_store is not None:
            return account.oauth.token_store
        return self.state_dir / "oauth" / f"{account.name}.json"

    def sink_token_store(self, account: AccountSettings, sink: SinkSettings) -> Path:
        """Where the refresh token of a sink's own OAuth2 login is stored."""
        oauth = getattr(sink, "oauth", None)
        if isinstance(oauth, OAuthSettings) and oauth.token_store is not None:
            return oauth.token_store
        safe = _UNSAFE_FILE_CHARS.sub("_", sink.label)[:80]
        return self.state_dir / "oauth" / f"{account.name}--{safe}.json"

    def account(self, name: str) -> AccountSettings:
        for account in self.accounts:
            if account.name == name:
                return account
        raise ConfigError(f"fetch.accounts: no account named {name!r}")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(["fetch", *(str(part) for part in item["loc"])])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def fetch_settings_from_dict(data: dict[str, Any], base: Path) -> FetchSettings:
    """Validate the ``[fetch]`` table; relative paths resolve against ``base``."""
    try:
        return FetchSettings.model_validate(data, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def load_fetch_settings(
    source: Path | Mapping[str, Any], base: Path | None = None
) -> FetchSettings:
    """Read ``source`` (a TOML file) and validate only its ``[fetch]`` table.

    ``source`` may also be the already parsed ``[fetch]`` table (``Config.fetch``);
    relative paths then resolve against ``base`` (default: the working directory).
    """
    if not isinstance(source, Path):
        return fetch_settings_from_dict(dict(source), base or Path.cwd())
    path = source
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    table = document.get("fetch", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: fetch: must be a table")
    try:
        return fetch_settings_from_dict(table, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
