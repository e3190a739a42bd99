"""The browser login (authorization code with PKCE and a loopback redirect) and dead logins.

The local authorization server (support.oauth) approves at once and redirects to the
redirect URI popbox asked for; each test plays the browser: it fetches the address
popbox printed, takes the redirect, and either follows it to popbox's loopback
listener or pastes it into popbox's standard input as a user on a headless server
would. The CLI tests run the real ``popbox oauth login`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from popbox.collector.config import FetchSettings, OAuthSettings, load_fetch_settings
from popbox.collector.oauth import (
    MsalRefreshTokenProvider,
    OAuthHttpClient,
    TokenFile,
    create_sink_token_provider,
    create_token_provider,
)
from popbox.collector.oauth.browser import BrowserOptions, generic_browser_login, pkce_pair
from popbox.collector.oauth.login import login_target
from popbox.errors import CollectorError, ConfigError, OAuthLoginRequired
from support.oauth import CLIENT_ID, FakeAuthServer, serve_auth

# Generous: only a hung login would take this long (never a timing assertion).
HANG: float = 60.0


@pytest.fixture
def tls_auth_server(tls_files: Any) -> Iterator[FakeAuthServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    yield from serve_auth(FakeAuthServer(), context)


def _google(server: FakeAuthServer, **extra: Any) -> dict[str, Any]:
    """A Google [oauth] table whose endpoints are the local server's."""
    return {
        "token_source": "refresh_token",
        "provider": "google",
        "client_id": CLIENT_ID,
        "token_endpoint": f"{server.url}/token",
        "authorization_endpoint": f"{server.url}/authorize",
        **extra,
    }


def _toml(prefix: str, table: dict[str, Any]) -> list[str]:
    """``table`` at ``prefix`` as TOML lines: sub-tables and arrays of tables nest."""

    def nested(value: object) -> bool:
        return isinstance(value, dict) or (
            isinstance(value, list) and bool(value) and isinstance(value[0], dict)
        )

    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items() if not nested(value)]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ["", f"[{prefix}.{key}]", *_toml(f"{prefix}.{key}", value)]
        elif nested(value):
            for item in value:
                lines += ["", f"[[{prefix}.{key}]]", *_toml(f"{prefix}.{key}", item)]
    return lines


def _config(
    tmp_path: Path, server: FakeAuthServer, *, pop3_oauth: bool = True, sinks: Any = None
) -> Path:
    account: dict[str, Any] = {
        "name": "desk",
        "host": "127.0.0.1",
        "username": "alice",
        "sinks": sinks or [{"kind": "maildir", "path": str(tmp_path / "md")}],
    }
    if pop3_oauth:
        account.update(auth="oauth2", oauth=_google(server))
    else:
        account.update(password_env="POPBOX_UNUSED_PASSWORD")
    fetch = {"state_dir": str(tmp_path / "state"), "accounts": [account]}
    path = tmp_path / "popbox.toml"
    path.write_text("\n".join(["[fetch]", *_toml("fetch", fetch)]) + "\n")
    return path


def _gmail_sink(server: FakeAuthServer) -> dict[str, Any]:
    return {"kind": "gmail", "name": "gmail-out", "oauth": _google(server)}


def _browse(url: str, **client: Any) -> str:
    """The browser's first leg: open the authorization address, get the redirect."""
    response = httpx.get(url, follow_redirects=False, timeout=HANG, **client)
    assert response.status_code == 302, response.text
    return response.headers["location"]


def _login_cli(config: Path, *args: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "popbox", "oauth", "login", "desk", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _printed_url(process: subprocess.Popen[str], prefix: str) -> str:
    assert process.stdout is not None
    seen = []
    while line := process.stdout.readline():
        seen.append(line)
        if line.strip().startswith(prefix):
            return line.strip()
    raise AssertionError("no authorization address printed: " + "".join(seen))


async def _in_background(login: Any, prefix: str) -> tuple[asyncio.Task[None], str, list[str]]:
    """Start an in-process login; returns its task, the address it printed, its output."""
    shown: list[str] = []
    printed: asyncio.Queue[str] = asyncio.Queue()

    def echo(line: str) -> None:
        shown.append(line)
        printed.put_nowait(line)

    task = asyncio.create_task(login(BrowserOptions(echo=echo, open_browser=False)))
    async with asyncio.timeout(HANG):
        while not (line := (await printed.get()).strip()).startswith(prefix):
            pass
    return task, line, shown


def _generic_client(server: FakeAuthServer) -> OAuthHttpClient:
    return OAuthHttpClient(f"{server.url}/token", CLIENT_ID, scopes=["pop"], timeout=HANG)


# ------------------------------------------------------------------ through the CLI


def test_browser_login_stores_a_0600_token_the_provider_then_uses(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, auth_server)
    # The "browser" webbrowser opens: BROWSER names a program that fetches the address
    # and follows the redirect to popbox's listener, as a desktop browser would.
    browser = tmp_path / "browser"
    browser.write_text(
        f"#!{sys.executable}\n"
        "import sys, httpx\n"
        "to = httpx.get(sys.argv[1], follow_redirects=False).headers['location']\n"
        "sys.exit(0 if 'You may close this page' in httpx.get(to).text else 1)\n"
    )
    browser.chmod(0o755)
    run = subprocess.run(
        [sys.executable, "-m", "popbox", "oauth", "login", "desk", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=HANG,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "BROWSER": str(browser)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "asked this machine's browser to open it" in run.stdout

    # Google's request: PKCE S256, the mail scope, and what gets a refresh token each time.
    (request,) = auth_server.authorizations
    assert request["code_challenge_method"] == "S256"
    assert request["scope"] == "https://mail.google.com/"
    assert (request["access_type"], request["prompt"]) == ("offline", "consent")
    assert urllib.parse.urlsplit(request["redirect_uri"]).hostname == "127.0.0.1"

    token_path = tmp_path / "state" / "oauth" / "desk.json"
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    assert json.loads(token_path.read_text())["refresh_token"] in auth_server.refresh_tokens
    settings = load_fetch_settings(config)
    provider = create_token_provider(settings.accounts[0], settings)
    token = asyncio.run(provider.token())
    assert auth_server.access_tokens[token] == "alice"


def test_headless_server_takes_the_pasted_redirect_address(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, auth_server)
    process = _login_cli(config, "--no-browser", stdin=subprocess.PIPE)
    try:
        url = _printed_url(process, auth_server.url)
        # The browser is on another machine: it cannot reach 127.0.0.1:PORT there,
        # so the user copies the address it ended on. A stray line first.
        landed = _browse(url)
        assert process.stdin is not None
        process.stdin.write("not an address\n" + landed + "\n")
        process.stdin.flush()
        output, _ = process.communicate(timeout=HANG)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "Not this sign-in" in output  # the stray line, refused
    assert "Signed in" in output
    stored = json.loads((tmp_path / "state" / "oauth" / "desk.json").read_text())
    assert stored["refresh_token"] in auth_server.refresh_tokens


def test_sink_login_has_its_own_token_file_and_leaves_the_pop3_login_alone(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, auth_server, sinks=[_gmail_sink(auth_server)])
    pop3_file = TokenFile(tmp_path / "state" / "oauth" / "desk.json")
    pop3_file.save({"format": "refresh_token", "refresh_token": "rt-pop3-login"})
    before = pop3_file.path.read_bytes()

    process = _login_cli(config, "--sink", "gmail-out", "--no-browser", stdin=subprocess.PIPE)
    try:
        landed = _browse(_printed_url(process, auth_server.url))
        httpx.get(landed, timeout=HANG)  # the browser reaches popbox's listener
        output, _ = process.communicate(timeout=HANG)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert auth_server.authorizations[0]["scope"].split() == [
        "https://www.googleapis.com/auth/gmail.insert",
        "https://www.googleapis.com/auth/gmail.labels",
        "https://www.googleapis.com/auth/gmail.readonly",
    ]
    assert pop3_file.path.read_bytes() == before
    sink_file = tmp_path / "state" / "oauth" / "desk--gmail-out.json"
    assert stat.S_IMODE(os.stat(sink_file).st_mode) == 0o600
    settings = load_fetch_settings(config)
    account = settings.accounts[0]
    provider = create_sink_token_provider(account, settings, account.sinks[0])
    assert auth_server.access_tokens[asyncio.run(provider.token())] == "alice"

    from popbox.cli import main

    status = CliRunner().invoke(main, ["oauth", "status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    pop3_line, sink_line = status.output.splitlines()[1:]
    assert pop3_line.split()[:4] == ["desk", "pop3", "google", "saved"]
    assert pop3_line.endswith(str(pop3_file.path))
    assert sink_line.split()[:5] == ["desk", "sink", "gmail-out", "google", "saved"]
    assert sink_line.endswith(str(sink_file))


def test_login_without_sink_picks_the_only_oauth_sink(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    imap = {
        "kind": "imap",
        "name": "archive-imap",
        "host": "127.0.0.1",
        "username": "alice",
        "auth": "oauth2",
        "oauth": _google(auth_server),
    }
    settings = load_fetch_settings(_config(tmp_path, auth_server, pop3_oauth=False, sinks=[imap]))
    target = login_target(settings, "desk", None)
    assert (target.sink, target.purpose) == ("archive-imap", "imap")
    assert target.store == tmp_path / "state" / "oauth" / "desk--archive-imap.json"
    assert target.default_flow() == "browser"  # Google: no device flow for mail scopes

    two = load_fetch_settings(
        _config(tmp_path, auth_server, pop3_oauth=False, sinks=[imap, _gmail_sink(auth_server)])
    )
    with pytest.raises(ConfigError, match="choose a sink with --sink: archive-imap, gmail-out"):
        login_target(two, "desk", None)


# ------------------------------------------------------------------ the listener


async def test_answer_with_another_state_is_refused_and_the_right_one_taken(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    token_file = TokenFile(tmp_path / "t.json")
    client = _generic_client(auth_server)
    task, url, _ = await _in_background(
        lambda options: generic_browser_login(
            client, f"{auth_server.url}/authorize", token_file, options
        ),
        auth_server.url,
    )
    landed = await asyncio.to_thread(_browse, url)
    split = urllib.parse.urlsplit(landed)
    query = dict(urllib.parse.parse_qsl(split.query))
    forged = split._replace(query=urllib.parse.urlencode({**query, "state": "guessed"}))
    root = f"http://{split.netloc}"
    async with httpx.AsyncClient(timeout=HANG) as browser:
        refused = await browser.get(urllib.parse.urlunsplit(forged))
        assert refused.status_code == 400
        assert "Not this sign-in" in refused.text
        assert (await browser.get(f"{root}/favicon.ico")).status_code == 404
        assert (await browser.get(f"{root}/?state={query['state']}")).status_code == 400  # no code
        taken = await browser.get(landed)
        assert taken.status_code == 200
        assert "You may close this page" in taken.text
    await asyncio.wait_for(task, HANG)
    stored = token_file.load()
    assert stored is not None
    assert stored["refresh_token"] in auth_server.refresh_tokens


async def test_access_denied_is_reported(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    auth_server.authorize_error = "access_denied"
    token_file = TokenFile(tmp_path / "t.json")
    client = _generic_client(auth_server)
    task, url, _ = await _in_background(
        lambda options: generic_browser_login(
            client, f"{auth_server.url}/authorize", token_file, options
        ),
        auth_server.url,
    )
    landed = await asyncio.to_thread(_browse, url)
    async with httpx.AsyncClient(timeout=HANG) as browser:
        page = await browser.get(landed)
    assert "Sign-in refused" in page.text
    with pytest.raises(CollectorError, match=r"refused: access_denied .*declined"):
        await asyncio.wait_for(task, HANG)
    assert token_file.load() is None


async def test_no_answer_ends_the_login(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    options = BrowserOptions(echo=lambda line: None, open_browser=False, max_wait=0.2)
    with pytest.raises(CollectorError, match="no answer within 1 minute"):
        await generic_browser_login(
            _generic_client(auth_server),
            f"{auth_server.url}/authorize",
            TokenFile(tmp_path / "t.json"),
            options,
        )


async def test_oversized_request_line_and_header_flood_are_not_read(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    client = _generic_client(auth_server)
    task, url, _ = await _in_background(
        lambda options: generic_browser_login(
            client, f"{auth_server.url}/authorize", TokenFile(tmp_path / "t.json"), options
        ),
        auth_server.url,
    )
    redirect = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["redirect_uri"]
    port = urllib.parse.urlsplit(redirect).port
    assert port is not None

    async def send(request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer

    long_line = b"GET /?state=" + b"a" * 40000 + b" HTTP/1.1\r\n\r\n"
    assert (await send(long_line)).startswith(b"HTTP/1.1 414 ")
    flood = b"GET / HTTP/1.1\r\n" + b"X-Flood: 1\r\n" * 500 + b"\r\n"
    assert (await send(flood)).startswith(b"HTTP/1.1 431 ")
    # The listener still takes the real answer afterwards.
    landed = await asyncio.to_thread(_browse, url)
    async with httpx.AsyncClient(timeout=HANG) as browser:
        assert (await browser.get(landed)).status_code == 200
    await asyncio.wait_for(task, HANG)
    # And closes once it has it: only one answer is ever taken.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=HANG).close()


async def test_stolen_code_without_the_verifier_is_invalid_grant(
    auth_server: FakeAuthServer,
) -> None:
    redirect = "http://127.0.0.1:9"
    client = _generic_client(auth_server)

    def authorize(challenge: str) -> str:
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": CLIENT_ID,
                "redirect_uri": redirect,
                "state": "s",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        landed = _browse(f"{auth_server.url}/authorize?{query}")
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(landed).query))["code"]

    verifier, challenge = pkce_pair()
    with pytest.raises(CollectorError, match="invalid_grant code_verifier"):
        await client.exchange_code(authorize(challenge), redirect, pkce_pair()[0])
    document = await client.exchange_code(authorize(challenge), redirect, verifier)
    assert auth_server.access_tokens[document["access_token"]] == "alice"


# ------------------------------------------------------------------ dead logins


@pytest.mark.parametrize("sink", [None, "gmail-out"])
async def test_dead_or_missing_login_names_the_command_that_mends_it(
    auth_server: FakeAuthServer, tmp_path: Path, sink: str | None
) -> None:
    settings = load_fetch_settings(_config(tmp_path, auth_server, sinks=[_gmail_sink(auth_server)]))
    account = settings.accounts[0]
    command = "popbox oauth login desk" + (" --sink gmail-out" if sink else "")

    def provider(settings: FetchSettings) -> Any:
        if sink is None:
            return create_token_provider(account, settings)
        return create_sink_token_provider(account, settings, account.sinks[0])

    with pytest.raises(OAuthLoginRequired, match=f"never signed in.*run `{command}`"):
        await provider(settings).token()
    store = (
        settings.oauth_token_store(account)
        if sink is None
        else settings.sink_token_store(account, account.sinks[0])
    )
    # Revoked, or expired (seven days for a Google app in testing): invalid_grant.
    TokenFile(store).save({"format": "refresh_token", "refresh_token": "rt-revoked"})
    with pytest.raises(OAuthLoginRequired, match=f"invalid_grant.*run `{command}`$"):
        await provider(settings).token()


async def test_unreachable_token_endpoint_is_not_a_dead_login(tmp_path: Path) -> None:
    token_file = TokenFile(tmp_path / "t.json")
    token_file.save({"refresh_token": "rt-1"})
    from popbox.collector.oauth import RefreshTokenProvider

    client = OAuthHttpClient("http://127.0.0.1:9/token", CLIENT_ID, timeout=HANG)
    with pytest.raises(CollectorError, match="OAuth endpoint") as caught:
        await RefreshTokenProvider(token_file, client).token()
    assert not isinstance(caught.value, OAuthLoginRequired)


# ------------------------------------------------------------------ Microsoft (msal)


async def test_microsoft_browser_login_through_msal_then_refresh_and_death(
    tls_auth_server: FakeAuthServer, tls_files: Any, tmp_path: Path
) -> None:
    from popbox.collector.oauth.microsoft import msal_browser_login

    authority = f"{tls_auth_server.url}/tenant"
    oauth = OAuthSettings(
        token_source="refresh_token",
        provider="microsoft",
        client_id=CLIENT_ID,
        authority=authority,
    )
    token_file = TokenFile(tmp_path / "ms.json")
    scopes = oauth.effective_scopes("imap")
    task, url, _ = await _in_background(
        lambda options: msal_browser_login(
            oauth, token_file, options, scopes=scopes, ca_file=tls_files.ca
        ),
        authority,
    )
    trust = ssl.create_default_context(cafile=str(tls_files.ca))
    landed = await asyncio.to_thread(_browse, url, verify=trust)
    (request,) = tls_auth_server.authorizations
    assert request["code_challenge_method"] == "S256"  # msal's own PKCE
    assert request["redirect_uri"].startswith("http://localhost:")
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in request["scope"].split()
    async with httpx.AsyncClient(timeout=HANG) as browser:
        assert (await browser.get(landed)).status_code == 200
    await asyncio.wait_for(task, HANG)
    assert stat.S_IMODE(os.stat(token_file.path).st_mode) == 0o600

    provider = MsalRefreshTokenProvider(
        token_file,
        client_id=CLIENT_ID,
        authority=authority,
        scopes=scopes,
        ca_file=tls_files.ca,
        what="fetch.accounts.desk: sink m365",
        sign_in="popbox oauth login desk --sink m365",
    )
    assert tls_auth_server.access_tokens[await provider.token()] == "alice"
    tls_auth_server.refresh_tokens.clear()  # revoked (or 90 days unused)
    with pytest.raises(
        OAuthLoginRequired, match=r"invalid_grant.*run `popbox oauth login desk --sink m365`"
    ):
        await provider.token(force_refresh=True)


def test_microsoft_sink_browser_login_through_the_cli(
    tls_auth_server: FakeAuthServer, tls_files: Any, tmp_path: Path
) -> None:
    authority = f"{tls_auth_server.url}/tenant"
    imap = {
        "kind": "imap",
        "name": "m365",
        "host": "outlook.office365.com",
        "username": "alice@example.com",
        "auth": "oauth2",
        "oauth": {
            "token_source": "refresh_token",
            "provider": "microsoft",
            "client_id": CLIENT_ID,
            "authority": authority,
        },
    }
    config = _config(tmp_path, tls_auth_server, pop3_oauth=False, sinks=[imap])
    # msal reaches the test authority through requests, which trusts this bundle.
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(tls_files.ca)}
    process = _login_cli(
        config, "--flow", "browser", "--no-browser", stdin=subprocess.PIPE, env=env
    )
    try:
        trust = ssl.create_default_context(cafile=str(tls_files.ca))
        landed = _browse(_printed_url(process, authority), verify=trust)
        assert httpx.get(landed, timeout=HANG).status_code == 200
        output, _ = process.communicate(timeout=HANG)
    finally:
        process.kill()
    assert process.returncode == 0, output
    (request,) = tls_auth_server.authorizations
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in request["scope"].split()
    stored = json.loads((tmp_path / "state" / "oauth" / "desk--m365.json").read_text())
    assert stored["format"] == "msal"


def test_an_oversized_pasted_line_is_skipped_whole() -> None:
    import io

    from popbox.collector.oauth.loopback import PASTED_URL_MAX, stdin_lines

    pasted = io.StringIO("x" * (3 * PASTED_URL_MAX) + "\nhttp://127.0.0.1:1/?code=c&state=s\n")
    assert list(stdin_lines(pasted)()) == ["http://127.0.0.1:1/?code=c&state=s\n"]
