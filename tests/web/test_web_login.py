"""Logging in and out of the web page: the cookie, the one failure for every wrong
guess, the per-address penalty, session fixation and expiry."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest

from popbox.backends import build_passdb, build_store
from popbox.net.service import bind_addresses
from popbox.web.app import create_app, serve_web
from popbox.web.csrf import LOGIN_COOKIE
from popbox.web.sessions import COOKIE_NAME
from support.web import (
    PASSWORDS,
    Site,
    csrf_token,
    log_in,
    open_archive,
    running_site,
    web_config,
)


def _set_cookie(response_headers: list[str], name: str) -> str:
    found = [value for value in response_headers if value.startswith(f"{name}=")]
    assert found, f"no Set-Cookie for {name}"
    return found[-1]


async def test_login_sets_a_strict_http_only_session_cookie_and_logout_ends_it(
    site: Site,
) -> None:
    async with site.client() as client:
        response = await log_in(client, "alice", PASSWORDS["alice"])
        assert response.status_code == 303
        assert response.headers["location"] == "/search"
        cookie = _set_cookie(response.headers.get_list("set-cookie"), COOKIE_NAME)
        flags = [part.strip().lower() for part in cookie.split(";")]
        assert "httponly" in flags
        assert "samesite=strict" in flags
        assert "path=/" in flags
        assert "secure" not in flags  # secure_cookies is off in this config
        page = await client.get("/search")
        assert page.status_code == 200
        assert 'id="current-user">alice<' in page.text

        out = await client.post("/logout", data={"csrf": csrf_token(page.text)})
        assert out.status_code == 303
        assert out.headers["location"] == "/login"
        # The old token is dead even if a copy of the cookie was kept.
        async with site.client(session=httpx_cookie(cookie)) as thief:
            again = await thief.get("/search")
        assert again.status_code == 303
        assert again.headers["location"] == "/login"


def httpx_cookie(set_cookie: str) -> str:
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


async def test_secure_cookies_mark_the_session_cookie_secure(tmp_path: Path) -> None:
    config = web_config(tmp_path, web={"secure_cookies": True})
    async with running_site(config, users={"alice": "pw-alice"}) as site, site.client() as client:
        form = await client.get("/login")
        login_cookie = _set_cookie(form.headers.get_list("set-cookie"), LOGIN_COOKIE)
        assert "secure" in [part.strip().lower() for part in login_cookie.split(";")]
        # httpx keeps Secure cookies for https only; a browser keeps them for loopback.
        token = csrf_token(form.text)
        response = await client.post(
            "/login",
            data={"username": "alice", "password": "pw-alice", "csrf": token},
            headers={"cookie": f"{LOGIN_COOKIE}={token}"},
        )
        cookie = _set_cookie(response.headers.get_list("set-cookie"), COOKIE_NAME)
        assert "secure" in [part.strip().lower() for part in cookie.split(";")]


async def test_wrong_password_and_unknown_user_get_the_same_page(site: Site) -> None:
    async with site.client() as client:
        wrong = await log_in(client, "alice", "not-her-password")
        unknown = await log_in(client, "mallory", "whatever")
        invalid = await log_in(client, "../etc/passwd", "whatever")
    assert wrong.status_code == unknown.status_code == invalid.status_code == 401
    assert wrong.text == unknown.text == invalid.text
    assert "Authentication failed." in wrong.text
    assert "alice" not in wrong.text
    assert "mallory" not in unknown.text
    assert COOKIE_NAME not in wrong.headers.get("set-cookie", "")


async def test_app_password_logs_in_as_for_pop3(site: Site) -> None:
    app_password = await site.useradmin.add_app_password("alice", "phone", scheme="SHA512-CRYPT")
    async with site.client() as client:
        response = await log_in(client, "alice", app_password)
        assert response.status_code == 303
        assert (await client.get("/search")).status_code == 200


async def test_guessing_from_one_address_is_penalised_until_a_success(tmp_path: Path) -> None:
    config = web_config(tmp_path, limits={"auth_penalty_max": 1.0, "auth_failure_delay": 0.3})
    async with running_site(config, users={"alice": "pw-alice"}) as site, site.client() as client:
        penalty = site.penalty
        assert penalty.delay("127.0.0.1") == 0
        started = time.monotonic()
        await log_in(client, "alice", "guess-1")
        # A wrong guess waits the failure delay, as a POP3 login does.
        assert time.monotonic() - started >= 0.3
        assert penalty.delay("127.0.0.1") == 1.0
        started = time.monotonic()
        response = await log_in(client, "alice", "pw-alice")
        # The penalty is served before the password is even looked at.
        assert time.monotonic() - started >= 0.9
        assert response.status_code == 303
        assert penalty.delay("127.0.0.1") == 0


async def test_login_replaces_a_planted_session_token(site: Site) -> None:
    async with site.client() as attacker:
        await log_in(attacker, "bob", PASSWORDS["bob"])
        planted = attacker.cookies[COOKIE_NAME]
    async with site.client() as fresh:
        token = csrf_token((await fresh.get("/login")).text)
    # The victim's browser carries the planted token when it logs in.
    async with site.client(session=planted) as victim:
        victim.cookies.set(LOGIN_COOKIE, token)
        response = await victim.post(
            "/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf": token}
        )
        assert response.status_code == 303
        issued = httpx_cookie(_set_cookie(response.headers.get_list("set-cookie"), COOKIE_NAME))
        assert issued != planted
    async with site.client(session=planted) as planter:
        assert (await planter.get("/search")).status_code == 303


async def test_session_ends_after_idle_time(tmp_path: Path) -> None:
    config = web_config(tmp_path, web={"session_idle": 60.0, "secure_cookies": False})
    async with running_site(config, users={"alice": "pw-alice"}) as site, site.client() as client:
        await log_in(client, "alice", "pw-alice")
        assert (await client.get("/search")).status_code == 200
        site.clock.advance(30)
        assert (await client.get("/search")).status_code == 200  # use renews it
        site.clock.advance(61)
        ended = await client.get("/search")
        assert ended.status_code == 303
        assert ended.headers["location"] == "/login"


async def test_session_ends_at_its_lifetime_however_busy(tmp_path: Path) -> None:
    config = web_config(tmp_path, web={"session_idle": 60.0, "session_lifetime": 100.0})
    async with running_site(config, users={"alice": "pw-alice"}) as site, site.client() as client:
        await log_in(client, "alice", "pw-alice")
        for _ in range(3):
            site.clock.advance(40)
            if (await client.get("/search")).status_code != 200:
                break
        assert (await client.get("/search")).status_code == 303


async def test_a_login_form_without_its_token_is_refused(site: Site) -> None:
    async with site.client() as client:
        await client.get("/login")
        response = await client.post(
            "/login", data={"username": "alice", "password": PASSWORDS["alice"]}
        )
        assert response.status_code == 403
        assert COOKIE_NAME not in client.cookies


async def test_cancelling_the_server_task_stops_the_page_and_frees_its_port(tmp_path: Path) -> None:
    config = web_config(tmp_path)
    archive = open_archive(config)
    passdb = build_passdb(config)
    store = build_store(config, passdb)
    app = create_app(config, archive=archive, passdb=passdb, store=store, useradmin=None)
    sock = bind_addresses(["127.0.0.1:0"])[0]
    port = sock.getsockname()[1]
    task = asyncio.create_task(serve_web(config, app, sock=sock))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/login")).status_code == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=5),
    ):
        pass
    await archive.close()
    await store.close()


async def test_a_restricted_account_is_refused_as_a_wrong_password(site: Site) -> None:
    """allow_nets and nologin (the user database's login restrictions) hold on the web
    page as for POP3, and the refusal tells a guesser nothing the wrong password
    does not."""
    await site.add_user("carol", "carol-secret")
    await site.add_user("dan", "dan-secret")
    passwd = site.config.auth.passwd_file
    lines = []
    for line in passwd.read_text().splitlines():
        fields = line.split(":")
        if fields[0] in ("carol", "dan"):
            fields += [""] * (8 - len(fields))
            fields[7] = "allow_nets=10.0.0.0/8" if fields[0] == "carol" else "nologin"
        lines.append(":".join(fields))
    passwd.write_text("".join(line + "\n" for line in lines))
    async with site.client() as client:
        outside = await log_in(client, "carol", "carol-secret")
        nologin = await log_in(client, "dan", "dan-secret")
        wrong = await log_in(client, "carol", "not-the-password")
    assert outside.status_code == nologin.status_code == wrong.status_code == 401
    assert outside.text == nologin.text == wrong.text
    carol = await site.passdb.lookup("carol")
    assert carol is not None
    assert carol.extra.get("allow_nets") == "10.0.0.0/8"  # the password was right
    assert await site.passdb.verify("carol", "carol-secret") is not None
