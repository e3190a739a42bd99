"""Typed settings of the collector: the ``[fetch]`` table, its accounts and their sinks.

The collector's settings live in the same TOML file as the server's, under ``[fetch]``
and ``[[fetch.accounts]]`` (each with ``[[fetch.accounts.sinks]]``). ``popbox fetch``
validates only that table, here; errors name the key (``fetch.accounts.0.port: ...``).
Relative paths resolve against the directory of the config file; ``~`` expands.

Secrets never sit in the file itself: each secret is named by exactly one of
``*_env`` (an environment variable), ``*_file`` (a file, trailing newline stripped) or
``*_command`` (a command whose standard output is the secret), read by ``SecretSource``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from popbox.errors import ConfigError

__all__ = [
    "AccountSettings",
    "CommandSinkSettings",
    "FetchSettings",
    "HeaderRule",
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
# A sink that has not answered in this time is treated as a temporary failure.
SINK_TIMEOUT: Final = 60.0
# Webhooks: ticket systems cap attachments around 10-25 MB; 10 MiB by default.
WEBHOOK_MAX_ATTACHMENT: Final = 10 * 1024 * 1024
# Webhooks: retries within one delivery attempt for 429/5xx/timeouts.
WEBHOOK_RETRIES: Final = 3

_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    value = value.expanduser()
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get("base")
    if not value.is_absolute() and isinstance(base, Path):
        value = base / value
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
"""A path from the config file: ``~`` expanded, relative to the file's directory."""

Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class SecretSource:
    """Where one secret comes from: exactly one of env, file, command is set."""

    env: str | None = None
    file: Path | None = None
    command: str | None = None
    key: str = "secret"
    """The config key, for error messages."""

    def read(self) -> str:
        """Return the secret; raise ConfigError naming the key when it is unavailable."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError(f"{self.key}: environment variable {self.env} is not set")
            return value
        if self.file is not None:
            try:
                return self.file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"{self.key}: cannot read {self.file}: {exc}") from exc
        if self.command is not None:
            # A list of words, not a shell: the command line comes from the config file.
            try:
                done = subprocess.run(
                    shlex.split(self.command),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConfigError(f"{self.key}: command failed: {exc}") from exc
            if done.returncode != 0:
                raise ConfigError(f"{self.key}: command exited {done.returncode}")
            return done.stdout.rstrip("\r\n")
        raise ConfigError(f"{self.key}: no secret configured")


def _secret(
    prefix: str, env: str | None, file: Path | None, command: str | None
) -> SecretSource | None:
    if env is None and file is None and command is None:
        return None
    return SecretSource(env=env, file=file, command=command, key=prefix)


def _at_most_one(prefix: str, *values: object) -> None:
    if sum(value is not None for value in values) > 1:
        raise ValueError(f"set only one of {prefix}_env, {prefix}_file, {prefix}_command")


# ---------------------------------------------------------------------------- sinks


class _SinkBase(_Model):
    name: str | None = None
    """A stable label for logs, status and the per-sink delivery record. Changing it
    makes the collector treat the sink as new (it redelivers what it has not recorded)."""
    timeout: float = Field(default=SINK_TIMEOUT, gt=0)
    """Seconds one delivery may take before it counts as a temporary failure."""


class MaildirSinkSettings(_SinkBase):
    kind: Literal["maildir"]
    path: ConfigPath
    """The Maildir (with cur/, new/, tmp/); created when missing."""

    @property
    def label(self) -> str:
        return self.name or f"maildir:{self.path}"


class MboxSinkSettings(_SinkBase):
    kind: Literal["mbox"]
    path: ConfigPath
    """An mboxrd file; appended under an fcntl lock and a ``.lock`` dotlock."""

    @property
    def label(self) -> str:
        return self.name or f"mbox:{self.path}"


class CommandSinkSettings(_SinkBase):
    kind: Literal["command"]
    command: str
    """Split into words like a shell would (no shell runs); the message is on stdin.
    Exit 0 = delivered, 75 (EX_TEMPFAIL) = try later, anything else = quarantine."""
    env: dict[str, str] = {}
    """Extra environment; POPBOX_ACCOUNT, POPBOX_UIDL, POPBOX_SHA256 and
    POPBOX_IDEMPOTENCY_KEY are always set."""

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: str) -> str:
        if not shlex.split(value):
            raise ValueError("must name a program")
        return value

    @property
    def label(self) -> str:
        return self.name or f"command:{shlex.split(self.command)[0]}"


class WebhookSinkSettings(_SinkBase):
    kind: Literal["webhook"]
    url: str
    """http:// or https:// endpoint that receives one JSON document per message."""
    secret_env: str | None = None
    secret_file: ConfigPath | None = None
    secret_command: str | None = None
    """The HMAC-SHA256 key for the signature header (optional)."""
    signature_header: str = "X-Popbox-Signature"
    headers: dict[str, str] = {}
    """Extra request headers (e.g. an API token for the ticket system)."""
    timeout: float = Field(default=30.0, gt=0)
    include_raw: bool = False
    """Also send the whole raw message, base64-encoded."""
    max_attachment_bytes: int = Field(default=WEBHOOK_MAX_ATTACHMENT, ge=0)
    """Attachments larger than this are listed without content."""
    retries: int = Field(default=WEBHOOK_RETRIES, ge=0)
    """Retries with backoff for 429, 5xx and timeouts before a temporary failure."""
    ca_file: ConfigPath | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _check_secret(self) -> WebhookSinkSettings:
        _at_most_one("secret", self.secret_env, self.secret_file, self.secret_command)
        return self

    def secret_source(self) -> SecretSource | None:
        return _secret("secret", self.secret_env, self.secret_file, self.secret_command)

    @property
    def label(self) -> str:
        return self.name or f"webhook:{self.url}"


class _MtaSinkBase(_SinkBase):
    host: str | None = None
    socket: ConfigPath | None = None
    """A unix socket instead of host/port (LMTP to Postfix/Dovecot, typically)."""
    tls: Literal["none", "starttls", "tls"] = "none"
    ca_file: ConfigPath | None = None
    recipients: list[str] = Field(min_length=1)
    sender: str = ""
    """The envelope sender; empty means the null sender ``<>``."""

    @model_validator(mode="after")
    def _check_target(self) -> _MtaSinkBase:
        if (self.host is None) == (self.socket is None):
            raise ValueError("set exactly one of host and socket")
        return self


class LmtpSinkSettings(_MtaSinkBase):
    kind: Literal["lmtp"]
    port: Port = 24

    @property
    def label(self) -> str:
        return self.name or f"lmtp:{self.socket or f'{self.host}:{self.port}'}"


class SmtpSinkSettings(_MtaSinkBase):
    kind: Literal["smtp"]
    port: Port = 25
    username: str | None = None
    password_env: str | None = None
    password_file: ConfigPath | None = None
    password_command: str | None = None

    @model_validator(mode="after")
    def _check_password(self) -> SmtpSinkSettings:
        _at_most_one("password", self.password_env, self.password_file, self.password_command)
        return self

    def password_source(self) -> SecretSource | None:
        return _secret("password", self.password_env, self.password_file, self.password_command)

    @property
    def label(self) -> str:
        return self.name or f"smtp:{self.socket or f'{self.host}:{self.port}'}"


class PopboxSinkSettings(_SinkBase):
    kind: Literal["popbox"]
    config: ConfigPath | None = None
    """The popbox server config whose store receives the message; None = this file."""
    user: str
    """The popbox user whose maildrop receives the message."""

    @property
    def label(self) -> str:
        return self.name or f"popbox:{self.user}"


class ArchiveSinkSettings(_SinkBase):
    kind: Literal["archive"]
    config: ConfigPath | None = None
    """The popbox server config whose archive keeps the message; None = this file."""
    user: str
    """The popbox user whose archive keeps the message (searchable on the web page)."""

    @property
    def label(self) -> str:
        return self.name or f"archive:{self.user}"


SinkSettings = Annotated[
    MaildirSinkSettings
    | MboxSinkSettings
    | CommandSinkSettings
    | WebhookSinkSettings
    | LmtpSinkSettings
    | SmtpSinkSettings
    | PopboxSinkSettings
    | ArchiveSinkSettings,
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------- auth


class OAuthSettings(_Model):
    """Where OAuth2 access tokens for XOAUTH2/OAUTHBEARER come from."""

    token_source: Literal["command", "refresh_token", "client_credentials"]
    """command: run ``token_command``; refresh_token: the token ``popbox oauth login``
    stored; client_credentials: app-only (Microsoft 365 POP.AccessAsApp)."""
    token_command: str | None = None
    """Prints an access token on standard output (e.g. ``oama access user@x``)."""
    provider: Literal["microsoft", "google", "generic"] = "microsoft"
    tenant: str = "common"
    """Microsoft Entra tenant (id or domain); client_credentials needs a real tenant."""
    authority: str | None = None
    """Overrides the authority URL derived from provider and tenant."""
    client_id: str | None = None
    client_secret_env: str | None = None
    client_secret_file: ConfigPath | None = None
    client_secret_command: str | None = None
    scopes: list[str] = []
    """Empty means the provider's POP scope (see ``effective_scopes``)."""
    token_store: ConfigPath | None = None
    """Where the refresh token lives; default ``STATE_DIR/oauth/ACCOUNT.json``."""
    token_endpoint: str | None = None
    """For provider "generic": the token endpoint URL."""
    device_authorization_endpoint: str | None = None
    """For provider "generic": the device authorization endpoint URL (RFC 8628)."""

    @model_validator(mode="after")
    def _check_source(self) -> OAuthSettings:
        _at_most_one(
            "client_secret",
            self.client_secret_env,
            self.client_secret_file,
            self.client_secret_command,
        )
        source = self.token_source
        if source == "command" and not self.token_command:
            raise ValueError("token_source = command needs token_command")
        if source != "command" and not self.client_id:
            raise ValueError(f"token_source = {source} needs client_id")
        if source == "client_credentials" and self.client_secret_source() is None:
            raise ValueError(
                "token_source = client_credentials needs client_secret_env, "
                "client_secret_file or client_secret_command"
            )
        return self

    def client_secret_source(self) -> SecretSource | None:
        return _secret(
            "client_secret",
            self.client_secret_env,
            self.client_secret_file,
            self.client_secret_command,
        )

    def effective_scopes(self) -> list[str]:
        """The configured scopes, or the provider's POP3 scope."""
        if self.scopes:
            return list(self.scopes)
        if self.provider == "google":
            return ["https://mail.google.com/"]
        if self.provider == "microsoft":
            app_only = self.token_source
            if app_only == "client_credentials":
                return ["https://outlook.office365.com/.default"]
            return ["https://outlook.office.com/POP.AccessAsUser.All", "offline_access"]
        return []


class HeaderRule(_Model):
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


# ---------------------------------------------------------------------------- accounts


class AccountSettings(_Model):
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
        if value is None:
            return None
        normal = value.replace(":", "").lower()
        if not _FINGERPRINT.match(normal):
            raise ValueError("must be a SHA-256 fingerprint: 64 hex digits")
        return normal

    @model_validator(mode="after")
    def _check_account(self) -> AccountSettings:
        _at_most_one("password", self.password_env, self.password_file, self.password_command)
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
        return _secret("password", self.password_env, self.password_file, self.password_command)


class FetchSettings(_Model):
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
