"""``[mailbox]``: folders, devices, retention and what removal does
(docs/mailbox-model.md), validated with the rest of the configuration (popbox.config),
and the per-user overrides read from a user's extra fields."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from popbox.auth.names import is_valid_username
from popbox.store.mailbox import Disposition, MailboxPolicy

__all__ = [
    "ACTIVE_DAYS",
    "KEEP_DAYS",
    "RECENT_DAYS",
    "SWEEP_INTERVAL",
    "TRASH_DAYS",
    "USER_POLICY_PREFIX",
    "MailboxSettings",
    "check_login_separators",
]

log = logging.getLogger("popbox.config")

# Gmail's recent mode looks back 30 days; so does popbox's by default.
RECENT_DAYS: Final = 30
# A device that has not logged in for a month (a lost phone, an old laptop) stops
# holding mail back; its own deletions still count while it comes back.
ACTIVE_DAYS: Final = 30
# What a Trash folder keeps, and what the KEEP disposition hides, before it goes:
# Thunderbird's and Gmail's 30 days.
TRASH_DAYS: Final = 30
KEEP_DAYS: Final = 30
# How often `popbox serve` sweeps every mailbox (expired retention, Trash, devices
# gone idle). Retention is counted in days, so an hour late changes nothing.
SWEEP_INTERVAL: Final = 3600.0


class MailboxSettings(BaseModel):
    """Folders, devices, retention and what removal does (docs/mailbox-model.md).

    Every policy value may be set per user by an extra field in the passwd file:
    ``popbox_disposition``, ``popbox_keep_days``, ``popbox_trash_days``,
    ``popbox_retention_days`` (a number or ``never``), ``popbox_active_days``,
    ``popbox_recent_days``, ``popbox_login_delay``; ``popbox_shared_with`` names the
    users (comma-separated) who may open the mailbox as ``MAILBOX*USER``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every table of the config

    device_separator: str = "~"
    """``alice~phone`` logs in as the device ``phone``; "" turns device names off.
    "~" is unreserved in URLs (curl), and not a user-name character."""
    folder_separator: str = "+"
    """``alice+invoices`` opens the folder ``invoices`` (Cyrus's form); "" turns it off."""
    master_separator: str = "*"
    """``support*bob`` opens the shared mailbox ``support`` with bob's password (Dovecot's
    master-user form); "" turns shared logins off."""
    recent_prefix: str = "recent:"
    """``recent:alice`` is a recent-mode login (Gmail's form); "" turns it off."""
    disposition: Literal["delete", "trash", "archive", "keep"] = "delete"
    keep_days: int = Field(default=KEEP_DAYS, ge=0)
    trash_days: int = Field(default=TRASH_DAYS, ge=0)
    retention_days: int | None = Field(default=None, ge=0)
    """Days after its first retrieval when a message is removed (EXPIRE); unset: never."""
    active_days: int = Field(default=ACTIVE_DAYS, ge=1)
    recent_days: int = Field(default=RECENT_DAYS, ge=1)
    login_delay: int = Field(default=0, ge=0)
    """Least seconds between two logins of one device (LOGIN-DELAY); 0: none."""
    folder_delivery: Literal["create", "existing", "inbox"] = "create"
    """Where mail for ``alice+invoices@`` goes: the folder, created on first delivery;
    the folder only if it exists (else INBOX); or always INBOX."""
    sweep_interval: float = Field(default=SWEEP_INTERVAL, gt=0)
    """Seconds between two sweeps of every mailbox inside ``popbox serve``."""

    @field_validator("device_separator", "folder_separator", "master_separator")
    @classmethod
    def _check_separator(cls, value: str) -> str:
        if len(value) > 1 or (
            value and (value.isalnum() or value in "._-@/:" or not value.isprintable())
        ):
            raise ValueError("must be one character that cannot be part of a name, or empty")
        return value

    @model_validator(mode="after")
    def _unambiguous(self) -> MailboxSettings:
        check_login_separators(
            device_separator=self.device_separator,
            folder_separator=self.folder_separator,
            master_separator=self.master_separator,
            recent_prefix=self.recent_prefix,
        )
        return self

    def default_policy(self) -> MailboxPolicy:
        return MailboxPolicy(
            disposition=Disposition(self.disposition),
            keep_days=self.keep_days,
            trash_days=self.trash_days,
            retention_days=self.retention_days,
            active_days=self.active_days,
            recent_days=self.recent_days,
            login_delay=self.login_delay,
        )

    def policy_for(self, extra: Mapping[str, str], *, user: str = "") -> MailboxPolicy:
        """The server's policy with the user's own extra fields on top.

        A malformed field is logged and ignored (the server's value stays): a typo
        in one line of the passwd file must not lock a user out or lose mail.
        """
        policy = self.default_policy()
        if not any(key.startswith(USER_POLICY_PREFIX) for key in extra):
            return policy
        values: dict[str, Any] = {}
        for name in _POLICY_DAYS:
            text = extra.get(USER_POLICY_PREFIX + name)
            if text is None:
                continue
            if name == "retention_days" and text.lower() == "never":
                values[name] = None
            elif text.isascii() and text.isdigit() and (name != "active_days" or int(text) > 0):
                values[name] = int(text)
            else:
                log.warning("user %s: %s%s=%r ignored", user, USER_POLICY_PREFIX, name, text)
        text = extra.get(USER_POLICY_PREFIX + "disposition")
        if text is not None:
            try:
                values["disposition"] = Disposition(text.lower())
            except ValueError:
                log.warning("user %s: %sdisposition=%r ignored", user, USER_POLICY_PREFIX, text)
        return dataclasses.replace(policy, **values)

    def shared_with(self, extra: Mapping[str, str]) -> frozenset[str]:
        """The users who may open this user's mailbox as members (``popbox_shared_with``)."""
        text = extra.get(USER_POLICY_PREFIX + "shared_with", "")
        return frozenset(name.strip() for name in text.split(",") if name.strip())


def check_login_separators(
    *, device_separator: str, folder_separator: str, master_separator: str, recent_prefix: str
) -> None:
    """ValueError (naming the setting) for separators that would make login names
    ambiguous: two alike, a device or master separator a user name may hold, or a
    recent prefix a user name could start with."""
    separators = {
        "device_separator": device_separator,
        "folder_separator": folder_separator,
        "master_separator": master_separator,
    }
    used = [value for value in separators.values() if value]
    if len(set(used)) != len(used):
        raise ValueError("the device, folder and master separators must differ")
    for key in ("device_separator", "master_separator"):
        # The folder separator may be a user-name character ("+"): the login broker
        # asks the user database which reading is meant. The others may not.
        if separators[key] and is_valid_username("a" + separators[key]):
            raise ValueError(f"mailbox.{key}: {separators[key]!r} can be part of a user name")
    if recent_prefix and (
        is_valid_username(recent_prefix + "a") or any(s in recent_prefix for s in used)
    ):
        raise ValueError(
            "mailbox.recent_prefix: must hold a character no user name has (as the "
            "':' of 'recent:') and no separator"
        )


# Per-user policy fields in the passwd file's extra fields start with this.
USER_POLICY_PREFIX: Final = "popbox_"
_POLICY_DAYS: Final = (
    "keep_days",
    "trash_days",
    "retention_days",
    "active_days",
    "recent_days",
    "login_delay",
)
