"""Attacks on the web page, each named after what it tries: forged forms, another
user's messages by id, admin pages for non-admins, oversized bodies, framing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from popbox.web.app import MAX_FORM_BODY
from support.web import PASSWORDS, Site, csrf_token, log_in, make_message


@pytest.mark.parametrize("token", [None, "", "forged-token-of-the-right-length-xxxxxxxxxxxxx"])
async def test_cross_site_request_forgery_without_the_token_is_refused(
    site: Site, token: str | None
) -> None:
    async with site.client() as client:
        await log_in(client, "root", PASSWORDS["root"])
        form = {"username": "mallory", "password": "evil-password"}
        if token is not None:
            form["csrf"] = token
        response = await client.post("/admin/users/add", data=form)
        assert response.status_code == 403
        logout = await client.post("/logout", data={} if token is None else {"csrf": token})
        assert logout.status_code == 403
        assert (await client.get("/search")).status_code == 200  # still logged in
    assert await site.useradmin.find_user("mallory") is None


async def test_cross_site_request_forgery_with_another_sessions_token_is_refused(
    site: Site,
) -> None:
    async with site.client() as attacker:
        await log_in(attacker, "bob", PASSWORDS["bob"])
        bobs_token = csrf_token((await attacker.get("/devices")).text)
    async with site.client() as victim:
        await log_in(victim, "root", PASSWORDS["root"])
        response = await victim.post(
            "/admin/users/add",
            data={"username": "mallory", "password": "evil-password", "csrf": bobs_token},
        )
        assert response.status_code == 403
    assert await site.useradmin.find_user("mallory") is None


async def test_cross_site_request_forgery_from_another_origin_is_refused(site: Site) -> None:
    async with site.client() as client:
        await log_in(client, "root", PASSWORDS["root"])
        token = csrf_token((await client.get("/admin/users")).text)
        form = {"username": "mallory", "password": "evil-password", "csrf": token}
        for headers in (
            {"origin": "https://evil.example"},
            {"sec-fetch-site": "cross-site", "origin": "null"},
            {"sec-fetch-site": "same-site"},
            {"referer": "https://evil.example/page"},
        ):
            response = await client.post("/admin/users/add", data=form, headers=headers)
            assert response.status_code == 403, headers
        assert await site.useradmin.find_user("mallory") is None
        # What a browser sends for our own form: Referrer-Policy no-referrer makes
        # its Origin "null", and Fetch Metadata says same-origin.
        same = await client.post(
            "/admin/users/add",
            data=form,
            headers={"origin": "null", "sec-fetch-site": "same-origin"},
        )
        assert same.status_code == 200
    assert await site.useradmin.find_user("mallory") is not None


async def test_login_cross_site_request_forgery_is_refused(site: Site) -> None:
    async with site.client() as client:
        token = csrf_token((await client.get("/login")).text)
        response = await client.post(
            "/login",
            data={"username": "bob", "password": PASSWORDS["bob"], "csrf": token},
            headers={"origin": "https://evil.example"},
        )
        assert response.status_code == 403


async def test_reading_another_users_message_by_id_finds_nothing(site: Site) -> None:
    message = make_message(
        "Bob's payslip",
        "Salary details.\n",
        html="<p>Salary</p>",
        attachments=(("slip.pdf", "application/pdf", b"%PDF"),),
    )
    bobs = await site.archive_message("bob", message)
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        missing = await client.get("/message/999999")
        assert missing.status_code == 404
        for path in (
            f"/message/{bobs}",
            f"/message/{bobs}/html",
            f"/message/{bobs}/part/1",
            f"/message/{bobs}/raw",
        ):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert response.text == missing.text
            assert "payslip" not in response.text.lower()
            assert "Salary" not in response.text
    async with site.client() as client:
        await log_in(client, "bob", PASSWORDS["bob"])
        assert (await client.get(f"/message/{bobs}/raw")).content == message


async def test_admin_pages_refuse_non_admins(site: Site) -> None:
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        token = csrf_token((await client.get("/devices")).text)
        for path in ("/admin/users", "/admin/collector"):
            assert (await client.get(path)).status_code == 403, path
        for path in ("/admin/users/add", "/admin/users/password", "/admin/users/remove"):
            response = await client.post(
                path,
                data={
                    "username": "alice",
                    "password": "taken-over",
                    "confirm": "yes",
                    "csrf": token,
                },
            )
            assert response.status_code == 403, path
        page = await client.get("/search")
        assert "/admin/users" not in page.text
    assert await site.useradmin.find_user("alice") is not None


async def test_pages_without_a_session_send_to_login_or_refuse(site: Site) -> None:
    async with site.client() as client:
        for path in (
            "/search",
            "/devices",
            "/message/1",
            "/message/1/raw",
            "/export",
            "/admin/users",
        ):
            response = await client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == "/login"
        assert (await client.post("/devices/forget", data={"device": "x"})).status_code == 403


async def test_an_oversized_form_body_is_refused_before_it_is_read(site: Site) -> None:
    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        token = csrf_token((await client.get("/devices")).text)
        response = await client.post(
            "/devices/forget", data={"csrf": token, "device": "x" * (MAX_FORM_BODY + 1)}
        )
        assert response.status_code == 413


async def test_clickjacking_every_page_forbids_framing_and_scripts(site: Site) -> None:
    async with site.client() as client:
        responses = [
            await client.get("/login"),
            await client.get("/no-such-page"),
            await client.get("/static/style.css"),
        ]
        await log_in(client, "alice", PASSWORDS["alice"])
        responses += [await client.get("/search"), await client.get("/devices")]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "script-src" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_an_oversized_chunked_form_body_is_refused_while_it_streams(site: Site) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"csrf=x&device="
        for _ in range(MAX_FORM_BODY // 1024 + 2):
            yield b"x" * 1024

    async with site.client() as client:
        await log_in(client, "alice", PASSWORDS["alice"])
        response = await client.post(
            "/devices/forget",
            content=body(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert "content-length" not in response.request.headers
        # The field bound (csrf.MAX_FORM_PART) or the body bound (MAX_FORM_BODY),
        # whichever the stream passes first, refuses it before it is all read.
        assert response.status_code in (400, 413)
