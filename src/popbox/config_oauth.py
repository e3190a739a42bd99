"""``[auth.oauth]``: how the server checks bearer tokens for OAUTHBEARER and XOAUTH2
(docs/oauth.md), validated with the rest of the configuration (popbox.config)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from popbox.auth.bearer import (
    CLOCK_SKEW,
    DEFAULT_ALGORITHMS,
    DEFAULT_USERNAME_CLAIM,
    BearerSettings,
)
from popbox.auth.issuer import HTTP_TIMEOUT, JWKS_CACHE_SECONDS, JWKS_MIN_REFETCH_SECONDS
from popbox.errors import ConfigError

__all__ = ["OAuthServerSettings"]


class OAuthServerSettings(BaseModel):
    """``[auth.oauth]``: bearer tokens as credentials for OAUTHBEARER and XOAUTH2
    (docs/oauth.md). Both mechanisms are offered only when this table is present."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every table of the config

    issuer: str = ""
    """The token issuer (``iss``); its keys are found from its metadata unless
    ``jwks_url`` is set. Needed by ``introspection_mode = "local"``."""
    audience: list[str] = Field(min_length=1)
    """Tokens must be meant for one of these (``aud``): e.g. the client id or the API
    URI registered for popbox at the issuer."""
    jwks_url: str = ""
    introspection_mode: Literal["local", "post", "get"] = "local"
    """``local``: JWTs checked with the issuer's keys; ``post``: RFC 7662 introspection;
    ``get``: the token appended to ``introspection_url`` (Google's tokeninfo)."""
    introspection_url: str = ""
    client_id: str = ""
    """popbox's own credentials at the introspection endpoint (HTTP Basic)."""
    client_secret: str = Field(default="", repr=False)
    client_secret_file: Path | None = None
    """A file holding the client secret (readable by the server's user)."""
    username_claim: str = DEFAULT_USERNAME_CLAIM
    """The claim that names the user (Dovecot's ``username_attribute``)."""
    domains: list[str] = []
    """A claim ``user@domain`` with one of these domains names the local user ``user``."""
    algorithms: list[str] = list(DEFAULT_ALGORITHMS)
    clock_skew: float = Field(default=CLOCK_SKEW, ge=0, le=600)
    jwks_cache_seconds: float = Field(default=JWKS_CACHE_SECONDS, gt=0)
    jwks_min_refetch_seconds: float = Field(default=JWKS_MIN_REFETCH_SECONDS, ge=0)
    timeout: float = Field(default=HTTP_TIMEOUT, gt=0, le=60)
    """Seconds a login waits for the issuer before failing with [SYS/TEMP]."""
    ca_file: Path | None = None
    """CA certificates for the issuer's HTTPS (default: the system's)."""
    scope: str = ""
    """The scope to tell clients whose token was refused."""

    @field_validator("issuer", "jwks_url", "introspection_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urllib.parse.urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        from popbox.config import is_loopback  # the module that holds this table

        if parts.scheme == "http" and parts.hostname and (
            parts.hostname == "localhost" or is_loopback(parts.hostname)
        ):
            return value  # an issuer on this machine
        raise ValueError("must be an https:// URL (http:// only on loopback)")

    @field_validator("audience", mode="before")
    @classmethod
    def _one_audience(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, value: list[str]) -> list[str]:
        return [domain.lower() for domain in value]

    @model_validator(mode="after")
    def _consistent(self) -> OAuthServerSettings:
        if self.client_secret and self.client_secret_file is not None:
            raise ValueError("set client_secret or client_secret_file, not both")
        self._bearer_settings("")  # every rule of BearerSettings, checked at load
        return self

    def bearer_settings(self) -> BearerSettings:
        """The verifier's settings, with the client secret read from its file."""
        secret = self.client_secret
        if self.client_secret_file is not None:
            try:
                secret = self.client_secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"auth.oauth.client_secret_file: cannot read {self.client_secret_file}: "
                    f"{exc.strerror}"
                ) from exc
        return self._bearer_settings(secret)

    def _bearer_settings(self, secret: str) -> BearerSettings:
        return BearerSettings(
            audience=tuple(self.audience),
            issuer=self.issuer,
            jwks_url=self.jwks_url,
            introspection_mode=self.introspection_mode,
            introspection_url=self.introspection_url,
            client_id=self.client_id,
            client_secret=secret,
            username_claim=self.username_claim,
            domains=tuple(self.domains),
            algorithms=tuple(self.algorithms),
            clock_skew=self.clock_skew,
            jwks_cache_seconds=self.jwks_cache_seconds,
            jwks_min_refetch_seconds=self.jwks_min_refetch_seconds,
            timeout=self.timeout,
            ca_file=str(self.ca_file) if self.ca_file is not None else None,
            scope=self.scope,
        )
