"""What every part of the collector's settings shares: paths, secrets, OAuth2, TLS pins.

``SecretSource`` reads one secret from exactly one of ``*_env``, ``*_file`` or
``*_command``; ``OAuthSettings`` says where access tokens come from, for the POP3
source of an account and for a sink that logs in somewhere (IMAP, the Gmail API),
each with its own stored login. ``collector.config`` re-exports all of it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)

from popbox.errors import ConfigError

__all__ = [
    "ConfigPath",
    "OAuthPurpose",
    "OAuthSettings",
    "Port",
    "SecretSource",
    "SettingsModel",
    "at_most_one",
    "normalise_fingerprint",
    "secret_from",
]

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


class SettingsModel(BaseModel):
    """Every collector settings table: unknown keys are errors, values are frozen."""

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


def secret_from(
    prefix: str, env: str | None, file: Path | None, command: str | None
) -> SecretSource | None:
    if env is None and file is None and command is None:
        return None
    return SecretSource(env=env, file=file, command=command, key=prefix)


def at_most_one(prefix: str, *values: object) -> None:
    if sum(value is not None for value in values) > 1:
        raise ValueError(f"set only one of {prefix}_env, {prefix}_file, {prefix}_command")


def normalise_fingerprint(value: str | None) -> str | None:
    """A SHA-256 certificate fingerprint as 64 lower-case hex digits (colons allowed in)."""
    if value is None:
        return None
    normal = value.replace(":", "").lower()
    if not _FINGERPRINT.match(normal):
        raise ValueError("must be a SHA-256 fingerprint: 64 hex digits")
    return normal


OAuthPurpose = Literal["pop3", "imap", "gmail"]
"""What a token is for: the scopes a provider asks for differ."""

GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
# users.messages.import needs gmail.insert; labels.create gmail.labels; finding a
# message again after an uncertain import (messages.list with q=) needs gmail.readonly
# (gmail.metadata does not allow q).
GOOGLE_GMAIL_API_SCOPES = (
    "https://www.googleapis.com/auth/gmail.insert",
    "https://www.googleapis.com/auth/gmail.labels",
    "https://www.googleapis.com/auth/gmail.readonly",
)


class OAuthSettings(SettingsModel):
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
    authorization_endpoint: str | None = None
    """For provider "generic": the authorization endpoint URL, for the browser login
    (authorization code with PKCE, RFC 7636); Google's is built in."""

    @model_validator(mode="after")
    def _check_source(self) -> OAuthSettings:
        at_most_one(
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
        return secret_from(
            "client_secret",
            self.client_secret_env,
            self.client_secret_file,
            self.client_secret_command,
        )

    def effective_scopes(self, purpose: OAuthPurpose = "pop3") -> list[str]:
        """The configured scopes, or the provider's scopes for ``purpose``."""
        if self.scopes:
            return list(self.scopes)
        if self.provider == "google":
            if purpose == "gmail":
                return list(GOOGLE_GMAIL_API_SCOPES)
            return [GOOGLE_MAIL_SCOPE]
        if self.provider == "microsoft":
            if self.token_source == "client_credentials":  # noqa: S105 a setting name
                return ["https://outlook.office365.com/.default"]
            delegated = "IMAP" if purpose == "imap" else "POP"
            return [f"https://outlook.office.com/{delegated}.AccessAsUser.All", "offline_access"]
        return []
