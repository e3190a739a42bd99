"""What CAPA announces before login: EXPIRE and LOGIN-DELAY, bounded over every user.

RFC 2449 sections 6.5 and 6.7: where a value can differ per user (here: by the
passwd file's ``popbox_retention_days`` and ``popbox_login_delay``), the server
MUST announce before authentication the largest LOGIN-DELAY and the smallest EXPIRE
that any user could have, and SHOULD append the token ``USER`` so the client knows
that a second CAPA after login tells its own value. popbox takes "the value
currently in use for any user": the server's setting and every user's own, read from
the user database when it can list its users (``auth.base.UserDirectory``). One that
cannot leaves the server's values, tagged USER, since any user might differ.

The passwd file may change while the server runs; the bounds are re-read at most
every ``ANNOUNCE_REFRESH`` seconds, in a thread, when a connection arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from popbox.auth.base import PassDB, UserDirectory, UserRecord
from popbox.config import MailboxSettings
from popbox.errors import AuthError

__all__ = ["ANNOUNCE_REFRESH", "Announcement", "Announcer", "announcement", "expire_text"]

log = logging.getLogger("popbox.pop3")

# How stale the pre-login bounds may be after the passwd file changed: the file itself
# is re-checked every few seconds, and a client that reads a slightly old bound at
# worst waits a little longer or leaves mail a little less long than it could.
ANNOUNCE_REFRESH: Final = 60.0


def expire_text(retention_days: int | None) -> str:
    """The EXPIRE argument for a retention: days, or NEVER for none."""
    return "NEVER" if retention_days is None else str(retention_days)


@dataclass(frozen=True, slots=True)
class Announcement:
    """EXPIRE and LOGIN-DELAY before login, and whether each differs per user."""

    expire: str
    expire_per_user: bool
    login_delay: int
    login_delay_per_user: bool


def announcement(settings: MailboxSettings, users: Iterable[UserRecord] | None) -> Announcement:
    """The bounds over the server's policy and every user's (None: users unknown)."""
    server = settings.default_policy()
    if users is None:
        return Announcement(expire_text(server.retention_days), True, server.login_delay, True)
    retentions = {server.retention_days}
    delays = {server.login_delay}
    for record in users:
        if not record.extra:
            continue  # the common case: the server's policy, nothing to compute
        policy = settings.policy_for(record.extra, user=record.name)
        retentions.add(policy.retention_days)
        delays.add(policy.login_delay)
    # None (no retention: NEVER) is the longest of all.
    days = [value for value in retentions if value is not None]
    return Announcement(
        expire=expire_text(min(days) if days else None),
        expire_per_user=len(retentions) > 1,
        login_delay=max(delays),
        login_delay_per_user=len(delays) > 1,
    )


class Announcer:
    """Keeps the pre-login announcement in step with the user database.

    ``changed`` is called with each new announcement (the first one too, from the
    constructor, which reads the users once while the service starts).
    """

    def __init__(
        self,
        settings: MailboxSettings,
        passdb: PassDB,
        loop: asyncio.AbstractEventLoop,
        changed: Callable[[Announcement], None],
    ) -> None:
        self._settings = settings
        self._directory = passdb if isinstance(passdb, UserDirectory) else None
        self._loop = loop
        self._changed = changed
        self._task: asyncio.Task[None] | None = None
        # The records last read: an unchanged file gives back the same objects, and
        # then nothing is computed (nor a bad field's warning logged again).
        self._seen: Sequence[UserRecord] = ()
        self._read_at = loop.time()
        try:
            users = self._directory.users() if self._directory is not None else None
        except AuthError as exc:
            # A user database that is away at start (PostgreSQL) leaves the server's
            # values, tagged USER, until a refresh can read the users.
            log.warning("cannot list users for CAPA's EXPIRE and LOGIN-DELAY: %s", exc)
            users = None
        self._current = announcement(settings, users)
        self._seen = users or ()
        changed(self._current)

    @property
    def current(self) -> Announcement:
        return self._current

    def maybe_refresh(self) -> asyncio.Task[None] | None:
        """Start re-reading the users in a thread if the last read is stale; the task
        that does it, if one was started."""
        if self._directory is None or self._task is not None:
            return None
        now = self._loop.time()
        if now - self._read_at < ANNOUNCE_REFRESH:
            return None
        self._read_at = now
        self._task = self._loop.create_task(self._refresh(self._directory))
        return self._task

    async def _refresh(self, directory: UserDirectory) -> None:
        try:
            users = await asyncio.to_thread(directory.users)
        except (AuthError, OSError) as exc:
            # Keep the old bounds: the database may be back at the next refresh.
            log.warning("cannot list users for CAPA's EXPIRE and LOGIN-DELAY: %s", exc)
            return
        finally:
            self._task = None
        seen = self._seen
        if len(users) == len(seen) and all(a is b for a, b in zip(users, seen, strict=True)):
            return
        self._seen = users
        fresh = announcement(self._settings, users)
        if fresh != self._current:
            self._current = fresh
            self._changed(fresh)

    async def close(self) -> None:
        """Stop a refresh in progress (the thread finishes on its own)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
