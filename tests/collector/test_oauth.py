"""Token providers and device login against a real local authorization server.

``FakeAuthServer`` speaks just enough OAuth2 (RFC 6749 token endpoint, RFC 8628 device
authorization, OpenID discovery for msal, RFC 7662 introspection for Dovecot) on
127.0.0.1 (support.oauth); test_oauth_dovecot.py uses it as Dovecot's introspection
endpoint.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from popbox.collector.oauth import (
    ClientCredentialsProvider,
    CommandTokenProvider,
    MsalClientCredentialsProvider,
    MsalRefreshTokenProvider,
    OAuthHttpClient,
    RefreshTokenProvider,
    TokenFile,
    create_token_provider,
    generic_device_login,
    login_command,
)
from popbox.errors import CollectorError
from support.fetch import write_fetch_config
from support.oauth import CLIENT_ID, CLIENT_SECRET, FakeAuthServer, serve_auth


@pytest.fixture
def tls_auth_server(tls_files: Any) -> Iterator[FakeAuthServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    yield from serve_auth(FakeAuthServer(), context)


def _client(server: FakeAuthServer, **kwargs: Any) -> OAuthHttpClient:
    return OAuthHttpClient(
        f"{server.url}/token", CLIENT_ID, scopes=["pop"],
        device_authorization_endpoint=f"{server.url}/device", timeout=5.0, **kwargs,
    )


# ---------------------------------------------------------------------------- command


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "token.py"
    path.write_text(body)
    return [sys.executable, str(path)]


async def test_command_token_is_cached_until_force_refresh(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    argv = _script(tmp_path, (
        "import pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "print(f'tok-{n}')\n"
    ))
    provider = CommandTokenProvider(argv)
    assert await provider.token() == "tok-1"
    assert await provider.token() == "tok-1"
    assert await provider.token(force_refresh=True) == "tok-2"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("import sys; sys.stderr.write('vault locked'); sys.exit(3)", "exited 3: vault locked"),
        ("print('two words')", "did not return a bearer token"),
        ("import time; time.sleep(30)", "timed out"),
    ],
)
async def test_command_failures_are_collector_errors(
    tmp_path: Path, body: str, match: str
) -> None:
    provider = CommandTokenProvider(_script(tmp_path, body), timeout=1.0)
    with pytest.raises(CollectorError, match=match):
        await provider.token()


# ---------------------------------------------------------------------------- generic


async def test_refresh_token_provider_caches_refreshes_and_saves_rotation(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    first = auth_server.issue("alice")
    token_file = TokenFile(tmp_path / "oauth" / "acct.json")
    token_file.save({"refresh_token": first["refresh_token"]})
    provider = RefreshTokenProvider(token_file, _client(auth_server))

    token = await provider.token()
    assert auth_server.access_tokens[token] == "alice"
    assert await provider.token() == token  # cached: no second request
    assert auth_server.grants("refresh_token") == 1
    newer = await provider.token(force_refresh=True)
    assert newer != token
    assert auth_server.grants("refresh_token") == 2
    # The server rotated the refresh token twice; the file holds the live one.
    stored = token_file.load()
    assert stored is not None
    assert stored["refresh_token"] in auth_server.refresh_tokens
    assert stat.S_IMODE(os.stat(token_file.path).st_mode) == 0o600


async def test_token_near_expiry_is_renewed(auth_server: FakeAuthServer, tmp_path: Path) -> None:
    auth_server.expires_in = 60  # inside the renewal margin: never served from cache
    token_file = TokenFile(tmp_path / "t.json")
    token_file.save({"refresh_token": auth_server.issue("alice")["refresh_token"]})
    provider = RefreshTokenProvider(token_file, _client(auth_server))
    assert await provider.token() != await provider.token()


async def test_revoked_refresh_token_says_to_log_in_again(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    token_file = TokenFile(tmp_path / "t.json")
    token_file.save({"refresh_token": "rt-unknown"})
    provider = RefreshTokenProvider(token_file, _client(auth_server))
    with pytest.raises(CollectorError, match=r"invalid_grant.*popbox oauth login"):
        await provider.token()
    missing = RefreshTokenProvider(TokenFile(tmp_path / "none.json"), _client(auth_server))
    with pytest.raises(CollectorError, match="no refresh token"):
        await missing.token()


async def test_client_credentials_over_http(auth_server: FakeAuthServer) -> None:
    provider = ClientCredentialsProvider(_client(auth_server, client_secret=CLIENT_SECRET))
    token = await provider.token()
    assert auth_server.access_tokens[token] == "app"
    bad = ClientCredentialsProvider(_client(auth_server, client_secret="wrong"))
    with pytest.raises(CollectorError, match="invalid_client"):
        await bad.token()


async def test_unreachable_token_endpoint_is_a_collector_error(tmp_path: Path) -> None:
    client = OAuthHttpClient("http://127.0.0.1:9/token", CLIENT_ID, timeout=2.0)
    with pytest.raises(CollectorError, match="OAuth endpoint"):
        await ClientCredentialsProvider(client).token()


async def test_generic_device_login_stores_refresh_token(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    shown: list[str] = []
    token_file = TokenFile(tmp_path / "state" / "oauth" / "acct.json")
    await generic_device_login(_client(auth_server), token_file, shown.append)
    assert "WDJB-MJHT" in shown[0]
    assert auth_server.grants("urn:ietf:params:oauth:grant-type:device_code") == 3
    provider = RefreshTokenProvider(token_file, _client(auth_server))
    assert auth_server.access_tokens[await provider.token()] == "alice"


async def test_device_flow_slows_down_when_told(auth_server: FakeAuthServer) -> None:
    client = _client(auth_server)
    code = await client.start_device_flow()
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    original = auth_server.token

    def slow_down_once(form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if not waits[1:]:
            return 400, {"error": "slow_down"}
        return original(form)

    auth_server.token = slow_down_once  # type: ignore[method-assign]
    auth_server.device_pending_polls = 0
    await client.finish_device_flow(code, sleep=record)
    assert waits == [0.0, 5.0]  # RFC 8628 3.5: slow_down adds five seconds


# ---------------------------------------------------------------------------- msal


async def test_msal_client_credentials_against_local_authority(
    tls_auth_server: FakeAuthServer, tls_files: Any
) -> None:
    provider = MsalClientCredentialsProvider(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
        authority=f"{tls_auth_server.url}/tenant", ca_file=tls_files.ca,
    )
    token = await provider.token()
    assert tls_auth_server.access_tokens[token] == "app"
    # Not asserted: msal's cache hit. msal files tokens under the authority's host
    # without its port, so with a test authority on 127.0.0.1:PORT every call misses.
    assert await provider.token(force_refresh=True) != token


async def test_msal_device_login_then_silent_refresh(
    tls_auth_server: FakeAuthServer, tls_files: Any, tmp_path: Path
) -> None:
    from popbox.collector.config import OAuthSettings
    from popbox.collector.oauth import msal_device_login

    oauth = OAuthSettings(
        token_source="refresh_token", provider="microsoft", client_id=CLIENT_ID,
        authority=f"{tls_auth_server.url}/tenant", scopes=["pop", "offline_access"],
    )
    token_file = TokenFile(tmp_path / "ms.json")
    shown: list[str] = []
    await _in_thread(msal_device_login, oauth, token_file, shown.append, ca_file=tls_files.ca)
    assert "WDJB-MJHT" in shown[0]
    assert stat.S_IMODE(os.stat(token_file.path).st_mode) == 0o600

    provider = MsalRefreshTokenProvider(
        token_file, client_id=CLIENT_ID, authority=f"{tls_auth_server.url}/tenant",
        scopes=["pop"], ca_file=tls_files.ca,
    )
    token = await provider.token()
    assert tls_auth_server.access_tokens[token] == "alice"
    refreshed = await provider.token(force_refresh=True)
    assert refreshed != token
    assert tls_auth_server.access_tokens[refreshed] == "alice"
    # Both calls used the refresh token (msal's access-token cache misses on a ported
    # test authority, see above); the server rotated it each time, so a fresh
    # provider works only if the rotated token reached the file.
    assert tls_auth_server.grants("refresh_token") == 2
    again = MsalRefreshTokenProvider(
        token_file, client_id=CLIENT_ID, authority=f"{tls_auth_server.url}/tenant",
        scopes=["pop"], ca_file=tls_files.ca,
    )
    assert tls_auth_server.access_tokens[await again.token()] == "alice"


async def _in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(function, *args, **kwargs)


# ---------------------------------------------------------------------------- wiring


def _config(tmp_path: Path, oauth: dict[str, Any]) -> Path:
    account = {
        "name": "desk", "host": "127.0.0.1", "username": "alice", "auth": "oauth2",
        "oauth": oauth, "sinks": [{"kind": "maildir", "path": str(tmp_path / "md")}],
    }
    return write_fetch_config(tmp_path / "popbox.toml", account, state_dir=tmp_path / "state")


def test_login_command_runs_the_generic_device_flow(
    auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, {
        "token_source": "refresh_token", "provider": "generic", "client_id": CLIENT_ID,
        "token_endpoint": f"{auth_server.url}/token",
        "device_authorization_endpoint": f"{auth_server.url}/device", "scopes": ["pop"],
    })
    from popbox.cli import main

    # Through the real command line: `popbox oauth login` is attached by the CLI.
    result = CliRunner().invoke(main, ["oauth", "login", "desk", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "WDJB-MJHT" in result.output
    stored = json.loads((tmp_path / "state" / "oauth" / "desk.json").read_text())
    assert stored["refresh_token"] in auth_server.refresh_tokens


def test_login_command_refuses_accounts_that_need_no_login(tmp_path: Path) -> None:
    config = _config(tmp_path, {"token_source": "command", "token_command": "true"})
    result = CliRunner().invoke(login_command, ["desk", "--config", str(config)])
    assert result.exit_code == 1
    assert "needs no login" in result.output


async def test_create_token_provider_picks_the_source(tmp_path: Path) -> None:
    from popbox.collector.config import load_fetch_settings

    settings = load_fetch_settings(_config(tmp_path, {
        "token_source": "command", "token_command": f"{sys.executable} -c \"print('t0k')\"",
    }))
    provider = create_token_provider(settings.accounts[0], settings)
    assert isinstance(provider, CommandTokenProvider)
    assert await provider.token() == "t0k"


def test_google_client_credentials_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from popbox.collector.config import load_fetch_settings
    from popbox.errors import ConfigError

    monkeypatch.setenv("POPBOX_TEST_CLIENT_SECRET", CLIENT_SECRET)
    settings = load_fetch_settings(_config(tmp_path, {
        "token_source": "client_credentials", "provider": "google", "client_id": CLIENT_ID,
        "client_secret_env": "POPBOX_TEST_CLIENT_SECRET",
    }))
    with pytest.raises(ConfigError, match="no client_credentials grant for Gmail"):
        create_token_provider(settings.accounts[0], settings)
