"""The collector as the admin page shows it: its accounts, their last results and what
sits in quarantine, read from the state database ``popbox fetch --status`` reads.

Read-only: the page opens the state database only when it exists (a collector that
never ran has nothing to show, and the page creates no files), reads, and closes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from popbox.collector.config import FetchSettings, load_fetch_settings
from popbox.collector.state import StateDB
from popbox.collector.state.base import AccountStatus, MessageRecord
from popbox.errors import CollectorError, ConfigError

__all__ = ["MAX_QUARANTINE_ROWS", "AccountView", "CollectorView", "collector_view"]

# Rows of quarantine shown per account: a page to read, not a dump; the rest are
# counted, and `popbox fetch --retry-quarantined` works on all of them.
MAX_QUARANTINE_ROWS: Final = 200


@dataclass(frozen=True, slots=True)
class AccountView:
    """One account: where it fetches from, its last results, its quarantine."""

    name: str
    enabled: bool
    server: str
    username: str
    sinks: tuple[str, ...]
    status: AccountStatus | None
    quarantine: tuple[MessageRecord, ...]

    @property
    def failing(self) -> bool:
        """The last run failed (an error newer than the last success)."""
        status = self.status
        if status is None or not status.last_error:
            return False
        return status.last_success is None or (status.last_error_at or 0) > status.last_success


class CollectorView:
    """The collector's accounts (``[fetch]``) and their state, read on demand."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings

    @property
    def state_db(self) -> Path:
        return self.settings.state_db_path

    @property
    def quarantine_dir(self) -> Path:
        return self.settings.quarantine_path

    async def accounts(self) -> list[AccountView]:
        """Every configured account with its state (none yet if it never ran)."""
        names = [account.name for account in self.settings.accounts]
        statuses: dict[str, AccountStatus] = {}
        quarantine: dict[str, list[MessageRecord]] = {}
        exists = bool(names) and await asyncio.to_thread(self.state_db.exists)
        if exists:
            db = StateDB(self.state_db)
            try:
                for status in await db.status(names):
                    statuses[status.account] = status
                for name in names:
                    if statuses[name].quarantined:
                        quarantine[name] = await db.quarantined(name)
            finally:
                await asyncio.to_thread(db.close)
        return [
            AccountView(
                name=account.name,
                enabled=account.enabled,
                server=f"{account.host}:{account.port or ''}".rstrip(":"),
                username=account.username,
                sinks=tuple(sink.label for sink in account.sinks),
                status=statuses.get(account.name),
                quarantine=tuple(quarantine.get(account.name, [])[:MAX_QUARANTINE_ROWS]),
            )
            for account in self.settings.accounts
        ]


def collector_view(fetch: Mapping[str, Any], base: Path | None = None) -> CollectorView | None:
    """The view of ``Config.fetch`` (None when there is no ``[fetch]`` table);
    ConfigError when it does not validate (``popbox check-config`` says where)."""
    if not fetch:
        return None
    try:
        return CollectorView(load_fetch_settings(fetch, base))
    except CollectorError as exc:
        raise ConfigError(f"fetch: {exc}") from exc
