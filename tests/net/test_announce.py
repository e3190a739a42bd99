"""What CAPA announces before login: RFC 2449's bounds over every user, kept current as
the user database changes."""

from __future__ import annotations

import asyncio

import pytest

from popbox.auth.base import UserRecord
from popbox.auth.memory import MemoryPassDB
from popbox.config import MailboxSettings
from popbox.net import announce
from popbox.net.announce import Announcement, Announcer, announcement


def user(name: str, **fields: str) -> UserRecord:
    return UserRecord(name, extra={f"popbox_{key}": value for key, value in fields.items()})


@pytest.mark.parametrize(
    ("settings", "users", "expected"),
    [
        pytest.param({}, [], Announcement("NEVER", False, 0, False), id="defaults"),
        pytest.param(
            {"retention_days": 30, "login_delay": 60},
            [user("a"), UserRecord("b", quota_messages=5, extra={"quota": "5"})],
            Announcement("30", False, 60, False),
            id="nobody-differs",
        ),
        pytest.param(
            {"retention_days": 30},
            [user("a", retention_days="5", login_delay="900"), user("b", retention_days="90")],
            Announcement("5", True, 900, True),
            id="smallest-expire-largest-delay",
        ),
        pytest.param(
            {},
            [user("a", retention_days="14")],
            Announcement("14", True, 0, False),
            id="never-is-the-longest",
        ),
        pytest.param(
            {"retention_days": 7},
            [user("a", retention_days="never")],
            Announcement("7", True, 0, False),
            id="a-user-who-keeps-forever",
        ),
        pytest.param(
            {"login_delay": 300},
            [user("a", login_delay="0")],
            Announcement("NEVER", False, 300, True),
            id="a-user-without-delay",
        ),
        pytest.param(
            {"login_delay": 300},
            [user("a", login_delay="soon")],
            Announcement("NEVER", False, 300, False),
            id="a-malformed-field-is-the-servers-value",
        ),
        pytest.param(
            {"retention_days": 3, "login_delay": 10},
            None,
            Announcement("3", True, 10, True),
            id="users-unknown",
        ),
    ],
)
def test_the_bounds_over_the_server_and_every_user(
    settings: dict[str, int], users: list[UserRecord] | None, expected: Announcement
) -> None:
    assert announcement(MailboxSettings(**settings), users) == expected


class Directory:
    """A user database whose users change under the server (a passwd file edited)."""

    def __init__(self, users: list[UserRecord]) -> None:
        self.records = users
        self.reads = 0

    def users(self) -> list[UserRecord]:
        self.reads += 1
        return list(self.records)

    async def verify(self, username: str, password: str) -> UserRecord | None:
        return None

    async def lookup(self, username: str) -> UserRecord | None:
        return None

    async def plaintext_secret(self, username: str) -> str | None:
        return None


async def test_the_announcement_follows_the_user_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Announcement] = []
    directory = Directory([user("a")])
    announcer = Announcer(
        MailboxSettings(), directory, asyncio.get_running_loop(), seen.append
    )
    assert seen == [Announcement("NEVER", False, 0, False)]
    announcer.maybe_refresh()  # read a moment ago: not stale yet
    assert directory.reads == 1
    monkeypatch.setattr(announce, "ANNOUNCE_REFRESH", 0.0)

    async def refreshed() -> None:
        task = announcer.maybe_refresh()
        assert task is not None
        await task

    directory.records = [user("a", login_delay="120")]
    await refreshed()
    assert seen[-1] == Announcement("NEVER", False, 120, True)
    assert announcer.current == seen[-1]
    # The same records again: nothing new to announce.
    await refreshed()
    assert len(seen) == 2
    assert directory.reads == 3
    await announcer.close()


async def test_a_user_database_that_cannot_list_its_users_tags_the_servers_values() -> None:
    class Opaque:
        async def verify(self, username: str, password: str) -> UserRecord | None:
            return None

        async def lookup(self, username: str) -> UserRecord | None:
            return None

        async def plaintext_secret(self, username: str) -> str | None:
            return None

    settings = MailboxSettings(retention_days=30)
    announcer = Announcer(settings, Opaque(), asyncio.get_running_loop(), lambda _: None)
    assert announcer.current == Announcement("30", True, 0, True)
    assert announcer.maybe_refresh() is None
    await announcer.close()


def test_the_memory_user_database_lists_its_users_with_their_fields() -> None:
    passdb = MemoryPassDB({"a": "x", "b": "y"}, {"b": user("b", login_delay="5")})
    assert passdb.users() == [UserRecord("a"), user("b", login_delay="5")]
