"""`popbox expire`, `popbox user show` and `popbox device forget`, run as an
administrator would: the real command (click's runner) on a config file and a passwd
file, against each store.

The memory store is the reference implementation of the mailbox model; the command
gets it through ``popbox.backends.build_store`` (the one store builder), so one
instance holds the state that the test's logins made. The Maildir store is the real
one, built by the command itself from the config; its variants fail until the
Maildir side of the mailbox model is in.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from popbox.cli import main
from popbox.config import Config, load_config
from popbox.store import MaildirStore, MailStore, MemoryStore
from popbox.store.base import Maildrop
from popbox.store.mailbox import DAY, INBOX, TRASH, MailboxPolicy, MailboxView

PASSWD = """\
# alice keeps mail for a day after its first retrieval, and removal moves to Trash
alice:{PLAIN}pw::::::popbox_retention_days=1 popbox_disposition=trash
bob:{PLAIN}pw::::::popbox_keep_days=oops
support:{PLAIN}pw::::::popbox_shared_with=bob,carol
"""



@dataclass
class Site:
    """A config file, its passwd file and the store the commands will use."""

    config_path: Path
    config: Config
    memory: MemoryStore | None

    @asynccontextmanager
    async def store(self) -> AsyncIterator[MailStore]:
        if self.memory is not None:
            yield self.memory
            return
        store = MaildirStore(self.config.storage.maildir_root)
        try:
            yield store
        finally:
            await store.close()

    def policy(self, user: str) -> MailboxPolicy:
        """What the server applies to ``user``: [mailbox] plus their passwd fields."""
        from popbox.auth.admin import list_users

        records = {r.name: r for r in list_users(self.config.auth.passwd_file)}
        return self.config.mailbox.policy_for(records[user].extra, user=user)

    def popbox(self, *args: str) -> Result:
        # Wide enough that rich puts every table row on one line.
        return CliRunner().invoke(
            main, [*args, "--config", str(self.config_path)], env={"COLUMNS": "250"}
        )

    def deliver(self, user: str, count: int, *, folder: str = INBOX) -> None:
        async def run() -> None:
            async with self.store() as store:
                for index in range(count):
                    await store.deliver(user, b"Subject: %d\n\nbody\n" % index, folder=folder)

        asyncio.run(run())

    def login(
        self,
        user: str,
        device: str,
        *,
        recent: bool = False,
        retrieve: Collection[int] = (),
        delete: Collection[int] = (),
    ) -> None:
        """One POP3 session of ``device``: RETR ``retrieve``, DELE ``delete``, QUIT."""

        async def run() -> None:
            view = MailboxView(device=device, recent=recent, policy=self.policy(user))
            async with self.store() as store:
                maildrop = await store.open_maildrop(user, view)
                for index in retrieve:
                    maildrop.mark_retrieved(index)
                await maildrop.commit_deletions(delete)

        asyncio.run(run())

    def usage(self, user: str) -> int:
        async def run() -> int:
            async with self.store() as store:
                return (await store.usage(user)).messages

        return asyncio.run(run())


def make_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory: MemoryStore | None) -> Site:
    """A config with its passwd file; the commands use ``memory`` if given, else the
    Maildir store the config names."""
    config_path = tmp_path / "popbox.toml"
    config_path.write_text('data_dir = "data"\n[mailbox]\nactive_days = 30\n')
    config = load_config(config_path)
    config.data_dir.mkdir()
    config.auth.passwd_file.write_text(PASSWD)
    config.auth.passwd_file.chmod(0o600)
    if memory is not None:
        monkeypatch.setattr("popbox.backends.build_store", lambda config, passdb=None: memory)
    return Site(config_path, config, memory)


@pytest.fixture(params=["memory", "maildir"])
def site(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    """Each store in turn."""
    memory = MemoryStore() if request.param == "memory" else None
    return make_site(tmp_path, monkeypatch, memory)


@pytest.fixture
def bare_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    """For what fails before any store is asked (the memory store, to be sure)."""
    return make_site(tmp_path, monkeypatch, MemoryStore())


def _row(output: str, *cells: str) -> bool:
    """Whether a line of ``output`` holds ``cells`` in this order (a table row)."""
    pattern = r".*".join(re.escape(cell) for cell in cells)
    return any(re.search(pattern, line) for line in output.splitlines())


# -- popbox expire ---------------------------------------------------------------------


def test_expire_applies_each_users_retention_from_the_passwd_file(site: Site) -> None:
    site.deliver("alice", 3)
    site.deliver("bob", 3)
    site.login("alice", "phone", retrieve=[0, 1])
    site.login("bob", "phone", retrieve=[0, 1])

    today = site.popbox("expire")
    assert today.exit_code == 0, today.output
    assert "swept 3 users: 0 removed, 0 moved, 0 hidden" in today.output

    later = site.popbox("expire", "--now", str(time.time() + 2 * DAY))
    assert later.exit_code == 0, later.output
    # alice's retention is a day and her disposition moves to Trash; bob keeps mail.
    assert "alice: 0 removed, 2 moved, 0 hidden" in later.output
    assert "bob:" not in later.output
    assert "swept 3 users: 0 removed, 2 moved, 0 hidden" in later.output
    assert site.usage("alice") == 3  # two of them in Trash now
    assert site.usage("bob") == 3
    trash = asyncio.run(_folders(site, "alice"))
    assert trash == [INBOX, TRASH]


async def _folders(site: Site, user: str) -> list[str]:
    async with site.store() as store:
        return await store.folders(user)


def test_expire_empties_trash_after_trash_days(site: Site) -> None:
    site.deliver("alice", 2)
    site.login("alice", "phone", delete=[0, 1])  # the only device: both go to Trash
    assert asyncio.run(_folders(site, "alice")) == [INBOX, TRASH]
    soon = site.popbox("expire", "alice", "--now", str(time.time() + 10 * DAY))
    assert soon.exit_code == 0, soon.output
    assert "swept 1 user: 0 removed, 0 moved, 0 hidden" in soon.output
    late = site.popbox("expire", "alice", "--now", str(time.time() + 31 * DAY))
    assert late.exit_code == 0, late.output
    assert "alice: 2 removed, 0 moved, 0 hidden" in late.output
    assert site.usage("alice") == 0


def test_expire_takes_iso_8601_and_names_the_moment(site: Site) -> None:
    result = site.popbox("expire", "bob", "--now", "2031-05-01T12:00:00+00:00")
    assert result.exit_code == 0, result.output
    epoch = site.popbox("expire", "bob", "--now", "1935403200")
    assert result.output.splitlines()[0] == epoch.output.splitlines()[0]
    assert result.output.startswith("as if at 2031-05-01")


def test_expire_refuses_a_moment_it_cannot_read(bare_site: Site) -> None:
    site = bare_site
    result = site.popbox("expire", "--now", "next tuesday")
    assert result.exit_code == 2
    assert "neither ISO 8601" in result.output


def test_expire_of_an_unknown_user_sweeps_nobody(site: Site) -> None:
    site.deliver("alice", 1)
    site.login("alice", "phone", retrieve=[0])
    result = site.popbox("expire", "alice", "zed", "--now", str(time.time() + 2 * DAY))
    assert result.exit_code == 1
    assert "no user zed" in result.output
    assert asyncio.run(_folders(site, "alice")) == [INBOX]


def test_expire_skips_a_folder_in_use_and_says_so(site: Site) -> None:
    site.deliver("alice", 1)
    site.login("alice", "phone", retrieve=[0])

    async def held() -> Maildrop:
        async with site.store() as store:
            return await store.open_maildrop("alice", MailboxView(policy=site.policy("alice")))

    maildrop = asyncio.run(held())
    try:
        result = site.popbox("expire", "alice", "--now", str(time.time() + 2 * DAY))
    finally:
        asyncio.run(maildrop.release())
    assert result.exit_code == 0, result.output
    assert "alice: 0 removed, 0 moved, 0 hidden; busy (swept next time): INBOX" in result.output
    assert asyncio.run(_folders(site, "alice")) == [INBOX]


class _FailingStore(MemoryStore):
    """A memory store whose sweep of one user fails as a broken disk would."""

    async def sweep(self, user: str, policy: MailboxPolicy, *, now: float | None = None) -> Any:
        from popbox.errors import StoreError

        if user == "bob":
            raise StoreError("bob's state file is unreadable")
        return await super().sweep(user, policy, now=now)


def test_expire_goes_on_after_a_failed_user_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site(tmp_path, monkeypatch, _FailingStore())
    site.deliver("alice", 1)
    site.deliver("support", 1)
    site.login("alice", "phone", retrieve=[0])
    result = site.popbox("expire", "--now", str(time.time() + 2 * DAY))
    assert result.exit_code == 1
    assert "alice: 0 removed, 1 moved, 0 hidden" in result.output
    assert "swept 3 users: 0 removed, 1 moved, 0 hidden; 1 failed: bob" in result.output


# -- popbox user show ------------------------------------------------------------------


def test_user_show_lists_folders_devices_and_where_the_policy_comes_from(site: Site) -> None:
    site.deliver("alice", 4)
    site.login("alice", "phone", delete=[0])
    site.login("alice", "laptop", recent=True)
    result = site.popbox("user", "show", "alice")
    assert result.exit_code == 0, result.output
    out = result.output
    # The phone is the only device that holds mail (the laptop only ever used recent
    # mode), so its deletion moved the message to Trash at once: still stored.
    assert "mail: 4 messages" in out
    assert "folders: INBOX (removal: trash), Trash (removal: delete)" in out
    assert _row(out, "disposition", "trash", "user")
    assert _row(out, "retention_days", "1 day", "user")
    assert _row(out, "active_days", "30 days", "server")
    assert _row(out, "INBOX", "laptop", "no", "3", "0")
    assert _row(out, "INBOX", "phone", "yes", "3", "0")
    # Logged in just now: a date and "today" (or "yesterday" across midnight).
    assert re.search(r"phone\W+\d{4}-\d\d-\d\d \d\d:\d\d \((today|yesterday)\)", out)
    assert _row(out, "Trash", "(none yet)")


def test_user_show_names_the_members_of_a_shared_mailbox(site: Site) -> None:
    result = site.popbox("user", "show", "support")
    assert result.exit_code == 0, result.output
    assert "shared with: bob, carol" in result.output
    assert _row(result.output, "INBOX", "(none yet)")


def test_user_show_says_which_user_field_was_ignored(site: Site) -> None:
    result = site.popbox("user", "show", "bob")
    assert result.exit_code == 0, result.output
    assert _row(result.output, "keep_days", "30 days", "server (popbox_keep_days='oops' ignored)")


def test_user_show_of_an_unknown_user_is_an_error(bare_site: Site) -> None:
    site = bare_site
    result = site.popbox("user", "show", "zed")
    assert result.exit_code == 1
    assert "no user zed in" in result.output


# -- popbox device forget --------------------------------------------------------------


def test_forgetting_a_device_releases_what_it_held(site: Site) -> None:
    site.deliver("bob", 2)
    site.login("bob", "laptop")  # holds message 0 back: it never deletes it
    site.login("bob", "phone", delete=[0])
    assert site.usage("bob") == 2
    swept = site.popbox("expire", "bob")
    assert "bob:" not in swept.output

    result = site.popbox("device", "forget", "bob", "laptop")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "forgot device laptop of bob in 1 folder"
    swept = site.popbox("expire", "bob")
    assert swept.exit_code == 0, swept.output
    assert "bob: 1 removed, 0 moved, 0 hidden" in swept.output
    assert site.usage("bob") == 1
    shown = site.popbox("user", "show", "bob")
    assert "laptop" not in shown.output


def test_forgetting_an_unknown_device_names_the_known_ones(site: Site) -> None:
    site.deliver("bob", 1)
    site.login("bob", "phone")
    site.login("bob", "laptop")
    result = site.popbox("device", "forget", "bob", "tablet")
    assert result.exit_code == 1
    assert "bob has no device 'tablet'; known devices: laptop, phone" in result.output


def test_forgetting_a_device_of_a_folder_in_use_asks_to_try_again(site: Site) -> None:
    site.deliver("bob", 1)
    site.login("bob", "phone")

    async def held() -> Maildrop:
        async with site.store() as store:
            view = MailboxView(device="phone", policy=site.policy("bob"))
            return await store.open_maildrop("bob", view)

    maildrop = asyncio.run(held())
    try:
        result = site.popbox("device", "forget", "bob", "phone")
    finally:
        asyncio.run(maildrop.release())
    assert result.exit_code == 1
    assert "try again when the session has ended" in result.output
    again = site.popbox("device", "forget", "bob", "phone")
    assert again.exit_code == 0, again.output


def test_forgetting_a_device_of_an_unknown_user_is_an_error(bare_site: Site) -> None:
    site = bare_site
    result = site.popbox("device", "forget", "zed", "phone")
    assert result.exit_code == 1
    assert "no user zed in" in result.output
