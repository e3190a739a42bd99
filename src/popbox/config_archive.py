"""``[archive]`` (what is kept, for how long, where) and ``[web]`` (the archive's web
page), validated with the rest of the configuration (popbox.config; docs/archive.md),
and the per-user overrides read from a user's extra fields."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from popbox.archive.base import ArchiveSource

__all__ = [
    "ARCHIVE_USER_FIELD",
    "ARCHIVE_USER_FIELD_DAYS",
    "SESSION_IDLE",
    "SESSION_LIFETIME",
    "WEB_LISTEN",
    "ArchiveDomain",
    "ArchivePolicy",
    "ArchiveSettings",
    "WebSettings",
]

log = logging.getLogger("popbox.config")

KeepWhat = Literal["delivered", "collected", "disposition"]

# A user's passwd line may say what is archived for them and for how long:
# popbox_archive=delivered,collected (or "none"), popbox_archive_days=365 (or "never").
ARCHIVE_USER_FIELD: Final = "popbox_archive"
ARCHIVE_USER_FIELD_DAYS: Final = "popbox_archive_days"
# Where the web page listens when it is on: loopback, as every popbox listener starts.
WEB_LISTEN: Final = "127.0.0.1:8080"
# OWASP's session guidance: 15-30 minutes idle for a low-risk application, a fixed
# upper bound on any session whatever its activity.
SESSION_IDLE: Final = 1800.0
SESSION_LIFETIME: Final = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class ArchivePolicy:
    """What the archive keeps for one user, and for how long (None: for ever)."""

    keep: frozenset[ArchiveSource]
    retention_days: int | None

    def keeps(self, source: ArchiveSource) -> bool:
        return source is ArchiveSource.IMPORTED or source in self.keep


class ArchiveDomain(BaseModel):
    """``[archive.domains."example.com"]``: the same settings for one domain's users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: list[KeepWhat] | None = None
    retention_days: int | None = Field(default=None, ge=1)


class ArchiveSettings(BaseModel):
    """``[archive]``: which messages are kept apart from the mailboxes, and how long.

    ``keep`` lists what is archived for every user: ``delivered`` (every delivery),
    ``collected`` (the collector's ``archive`` sinks; an account names one to archive
    at all), ``disposition`` (what the ``archive`` disposition removes from a mailbox).
    A domain's table, then the user's own ``popbox_archive`` field, override it.
    Imports (``popbox archive import``) are always kept.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: list[KeepWhat] = []
    retention_days: int | None = Field(default=None, ge=1)
    """Days an entry is kept after it came in (held entries stay); unset: for ever."""
    path: Path | None = None
    """Where the embedded archive lives (its SQLite index and its objects); default
    ``data_dir/archive``."""
    backend: Literal["sqlite", "postgresql"] | None = None
    """``sqlite`` (files under ``path``) or ``postgresql`` (the ``[postgresql]``
    database); unset: PostgreSQL when ``storage.backend`` is, else SQLite."""
    domains: dict[str, ArchiveDomain] = {}

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, value: dict[str, ArchiveDomain]) -> dict[str, ArchiveDomain]:
        return {domain.lower(): settings for domain, settings in value.items()}

    def policy_for(self, user: str, extra: Mapping[str, str]) -> ArchivePolicy:
        """The server's settings, the user's domain's on top, the user's own on top.

        A malformed user field is logged and ignored, as the mailbox policy's are.
        """
        keep: list[str] = list(self.keep)
        days = self.retention_days
        _, at, domain = user.rpartition("@")
        settings = self.domains.get(domain.lower()) if at else None
        if settings is not None:
            keep = list(settings.keep) if settings.keep is not None else keep
            days = settings.retention_days if settings.retention_days is not None else days
        text = extra.get(ARCHIVE_USER_FIELD)
        if text is not None:
            words = [word.strip().lower() for word in text.split(",") if word.strip()]
            allowed = {"delivered", "collected", "disposition"}
            if words == ["none"]:
                keep = []
            elif words and all(word in allowed for word in words):
                keep = words
            else:
                log.warning("user %s: %s=%r ignored", user, ARCHIVE_USER_FIELD, text)
        text = extra.get(ARCHIVE_USER_FIELD_DAYS)
        if text is not None:
            if text.lower() == "never":
                days = None
            elif text.isascii() and text.isdigit() and int(text) > 0:
                days = int(text)
            else:
                log.warning("user %s: %s=%r ignored", user, ARCHIVE_USER_FIELD_DAYS, text)
        return ArchivePolicy(frozenset(ArchiveSource(word) for word in keep), days)


class WebSettings(BaseModel):
    """``[web]``: the archive's web page (search, read, export; admin pages)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Serve the page inside ``popbox serve`` (``popbox web`` serves it on its own)."""
    listen: str = WEB_LISTEN
    admins: list[str] = []
    """Users who see the admin pages (users, quotas, devices, the collector)."""
    session_idle: float = Field(default=SESSION_IDLE, gt=0)
    """Seconds without a request after which a session ends."""
    session_lifetime: float = Field(default=SESSION_LIFETIME, gt=0)
    """Seconds after its login when a session ends, however busy."""
    secure_cookies: bool = True
    """Mark the session cookie Secure. Browsers accept Secure cookies from
    http://127.0.0.1 and http://localhost; anywhere else, serve the page over HTTPS
    (a reverse proxy) rather than turning this off."""
