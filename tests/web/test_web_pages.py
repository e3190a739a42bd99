"""The web page's everyday use: search with marked snippets and pages, the mailbox
summary, devices and forgetting one, and the admin pages (users, the collector)."""

from __future__ import annotations

import re
from pathlib import Path

from popbox.archive.base import DEFAULT_PAGE
from popbox.store.mailbox import MailboxView
from support.web import PASSWORDS, Site, csrf_token, log_in, make_message, running_site, web_config


async def test_search_lists_newest_first_with_marked_snippets(site: Site) -> None:
    await site.archive_message(
        "alice",
        make_message(
            "Older <b>note</b>",
            "The rocket <launch> is on Friday.\n",
            date="Mon, 02 Nov 2026 09:00:00 +0000",
        ),
    )
    await site.archive_message(
        "alice",
        make_message(
            "Newer note",
            "Another rocket launch.\n",
            attachments=(("plan.txt", "text/plain", b"plan"),),
            date="Mon, 07 Dec 2026 09:00:00 +0000",
        ),
    )
    await site.archive_message("bob", make_message("Bob's rocket", "rocket rocket\n"))
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        page = await client.get("/search", params={"q": "rocket"})
    assert page.status_code == 200
    rows = re.findall(r'<tr class="result" data-id="(\d+)">(.*?)</tr>', page.text, re.S)
    assert len(rows) == 2
    assert "Newer note" in rows[0][1]
    assert "Older &lt;b&gt;note&lt;/b&gt;" in rows[1][1]
    assert "Bob" not in page.text
    assert 'class="has-attachment' in rows[0][1]
    assert 'class="has-attachment' not in rows[1][1]
    assert "<mark>rocket</mark>" in page.text.lower()
    assert "&lt;launch&gt;" in page.text  # the snippet's own text is escaped
    assert re.search(r'id="total"[^>]*>2 messages', page.text)


async def test_search_pages_through_many_results(site: Site) -> None:
    for number in range(DEFAULT_PAGE + 3):
        await site.archive_message("alice", make_message(f"Message {number}", f"Body {number}\n"))
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        first = await client.get("/search")
        second = await client.get("/search", params={"page": "2"})
    assert first.text.count('<tr class="result"') == DEFAULT_PAGE
    assert 'class="next"' in first.text
    assert 'class="prev"' not in first.text
    assert second.text.count('<tr class="result"') == 3
    assert 'class="prev"' in second.text
    assert 'class="next"' not in second.text


async def test_search_page_shows_the_mailbox_now(site: Site) -> None:
    await site.store.deliver("alice", make_message("In the inbox", "x\n"))
    await site.store.deliver("alice", make_message("Sorted away", "y\n"), folder="Work")
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        page = await client.get("/search")
    mailbox = page.text.split('id="mailbox"', 1)[1].split("</section>", 1)[0]
    assert "<strong>2</strong> messages" in mailbox
    assert re.findall(r'<li class="folder">([^<]+)</li>', mailbox) == ["INBOX", "Work"]


async def test_devices_lists_and_forgets_a_device(site: Site) -> None:
    for device in ("phone", "laptop"):
        maildrop = await site.store.open_maildrop("alice", MailboxView(device=device))
        await maildrop.release()
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        page = await client.get("/devices")
        assert sorted(re.findall(r'data-device="([^"]+)"', page.text)) == ["laptop", "phone"]
        forgot = await client.post(
            "/devices/forget", data={"device": "phone", "csrf": csrf_token(page.text)}
        )
        assert forgot.status_code == 200
        assert 'id="notice"' in forgot.text
        unknown = await client.post(
            "/devices/forget", data={"device": "tablet", "csrf": csrf_token(page.text)}
        )
        assert unknown.status_code == 404
    left = {device.device for device in await site.store.devices("alice")}
    assert left == {"laptop"}


async def test_admin_adds_a_user_who_can_then_log_in(site: Site) -> None:
    async with site.client() as admin:
        await log_in(admin, "root", PASSWORDS["root"])
        page = await admin.get("/admin/users")
        assert page.status_code == 200
        assert set(re.findall(r'<tr class="user" data-user="([^"]+)"', page.text)) == set(PASSWORDS)
        added = await admin.post(
            "/admin/users/add",
            data={
                "username": "dave",
                "password": "dave-secret",
                "quota_messages": "100",
                "quota_size": "10M",
                "csrf": csrf_token(page.text),
            },
        )
        assert added.status_code == 200
        assert "Added dave." in added.text
        again = await admin.post(
            "/admin/users/add",
            data={
                "username": "dave",
                "password": "x",
                "csrf": csrf_token(page.text),
            },
        )
        assert again.status_code == 400
        assert 'id="error"' in again.text
    record = await site.useradmin.find_user("dave")
    assert record is not None
    assert (record.quota_messages, record.quota_octets) == (100, 10 * 1024 * 1024)
    async with site.client() as client:
        response = await log_in(client, "dave", "dave-secret")
        assert response.status_code == 303
        assert (await client.get("/search")).status_code == 200


async def test_admin_password_change_and_removal_end_the_users_sessions(site: Site) -> None:
    async with site.client() as bob, site.client() as admin:
        await log_in(bob, "bob", PASSWORDS["bob"])
        assert (await bob.get("/search")).status_code == 200
        await log_in(admin, "root", PASSWORDS["root"])
        token = csrf_token((await admin.get("/admin/users")).text)
        changed = await admin.post(
            "/admin/users/password",
            data={
                "username": "bob",
                "password": "new-bob-secret",
                "csrf": token,
            },
        )
        assert changed.status_code == 200
        assert (await bob.get("/search")).status_code == 303
        assert (await log_in(bob, "bob", PASSWORDS["bob"])).status_code == 401
        assert (await log_in(bob, "bob", "new-bob-secret")).status_code == 303
        quota = await admin.post(
            "/admin/users/quota",
            data={
                "username": "bob",
                "quota_messages": "",
                "quota_size": "1G",
                "csrf": token,
            },
        )
        assert quota.status_code == 200
        unconfirmed = await admin.post(
            "/admin/users/remove", data={"username": "bob", "csrf": token}
        )
        assert unconfirmed.status_code == 400
        assert await site.useradmin.find_user("bob") is not None
        removed = await admin.post(
            "/admin/users/remove", data={"username": "bob", "confirm": "yes", "csrf": token}
        )
        assert removed.status_code == 200
        assert 'data-user="bob"' not in removed.text
        assert (await bob.get("/search")).status_code == 303
    assert await site.useradmin.find_user("bob") is None


async def test_admin_sees_the_collector_accounts_read_only(tmp_path: Path) -> None:
    fetch = {
        "state_dir": str(tmp_path / "fetch"),
        "accounts": [
            {
                "name": "work",
                "host": "pop.example.org",
                "username": "me@example.org",
                "password_env": "WORK_PASSWORD",
                "sinks": [{"kind": "maildir", "path": str(tmp_path / "Maildir")}],
            }
        ],
    }
    config = web_config(tmp_path, web={"admins": ["root"]}, fetch=fetch)
    async with running_site(config, users={"root": "root-pw"}) as site, site.client() as client:
        await log_in(client, "root", "root-pw")
        page = await client.get("/admin/collector")
    assert page.status_code == 200
    assert 'data-account="work"' in page.text
    assert "pop.example.org" in page.text
    assert not (tmp_path / "fetch").exists()  # the page only reads
