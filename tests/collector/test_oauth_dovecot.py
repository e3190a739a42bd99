"""XOAUTH2 and OAUTHBEARER end to end: a real Dovecot checks every token with us.

Dovecot's oauth2 passdb asks the local FakeAuthServer (RFC 7662 introspection, POST)
whether the bearer token the collector sent is active and whose it is. Tokens come
from the collector's own RefreshTokenProvider, exchanged at the same fake server, so
a token Dovecot accepts is one our OAuth code really obtained. An expired token is
simulated by the server revoking every access token it issued.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.auth import build_token_provider
from popbox.collector.config import FetchSettings
from popbox.collector.oauth import RefreshTokenProvider, TokenFile
from support.dovecot import DOVECOT, DovecotServer, start_dovecot
from support.fetch import MakeSettings, maildir_messages, message, only_account, poll
from support.oauth import CLIENT_ID, FakeAuthServer

pytestmark = pytest.mark.interop


def _oauth2_config(root: Path, introspection_url: str) -> str:
    ext = root / "dovecot-oauth2.conf.ext"
    root.mkdir(parents=True, exist_ok=True)
    ext.write_text(
        f"introspection_mode = post\n"
        f"introspection_url = {introspection_url}\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
        # Dovecot would otherwise trust a tokeninfo answer; we want every token
        # checked against the live introspection endpoint.
        "force_introspection = yes\n"
    )
    return (
        "auth_mechanisms = plain login xoauth2 oauthbearer\n"
        "passdb {\n"
        "  driver = oauth2\n"
        "  mechanisms = xoauth2 oauthbearer\n"
        f"  args = {ext}\n"
        "}\n"
    )


@pytest.fixture
def oauth_dovecot(
    tls_files: Any, shared_tmp: Path, auth_server: FakeAuthServer
) -> Iterator[DovecotServer]:
    """A private Dovecot that checks bearer tokens with ``auth_server``."""
    root = shared_tmp / "dovecot"
    extra = _oauth2_config(root, f"{auth_server.url}/introspect")
    server = start_dovecot(root, tls_files.cert, tls_files.key, extra_config=extra)
    server.add_user("alice", "not-used-by-oauth")
    try:
        yield server
    finally:
        server.stop()


def _settings(
    make_settings: MakeSettings, server: DovecotServer, auth_server: FakeAuthServer,
    mechanism: str,
) -> FetchSettings:
    return make_settings(
        server,
        auth="oauth2",
        auth_mechanism=mechanism,
        oauth={
            "token_source": "refresh_token",
            "provider": "generic",
            "client_id": CLIENT_ID,
            "token_endpoint": f"{auth_server.url}/token",
        },
    )


def _store_login(settings: FetchSettings, auth_server: FakeAuthServer) -> TokenFile:
    """What `popbox oauth login` leaves behind: a refresh token in the state dir."""
    account = only_account(settings)
    token_file = TokenFile(settings.oauth_token_store(account))
    token_file.save({"refresh_token": auth_server.issue("alice")["refresh_token"]})
    auth_server.access_tokens.clear()  # only tokens the collector fetches itself count
    return token_file


def test_dovecot_accepts_the_oauth2_configuration(oauth_dovecot: DovecotServer) -> None:
    shown = subprocess.run(
        [DOVECOT, "-n", "-c", str(oauth_dovecot.config_path)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "driver = oauth2" in shown
    assert "xoauth2 oauthbearer" in shown


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_bearer_token_from_our_provider_logs_in(
    oauth_dovecot: DovecotServer, auth_server: FakeAuthServer,
    make_settings: MakeSettings, tmp_path: Path, mechanism: str,
) -> None:
    oauth_dovecot.add_message("alice", message(1))
    settings = _settings(make_settings, oauth_dovecot, auth_server, mechanism)
    _store_login(settings, auth_server)
    tokens = build_token_provider(only_account(settings), settings)
    assert isinstance(tokens, RefreshTokenProvider)

    result = await poll(settings, tokens=tokens)
    assert result.ok, f"{result.error}\n{oauth_dovecot.log()}"
    assert result.delivered == 1
    assert maildir_messages(tmp_path / "out") == [message(1)]
    checked = [form["token"] for path, form in auth_server.requests if path == "/introspect"]
    assert checked  # Dovecot really asked about the token
    assert all(token in auth_server.access_tokens for token in checked)


async def test_expired_token_is_refreshed_and_the_session_reauthenticated(
    oauth_dovecot: DovecotServer, auth_server: FakeAuthServer,
    make_settings: MakeSettings, tmp_path: Path,
) -> None:
    settings = _settings(make_settings, oauth_dovecot, auth_server, "xoauth2")
    _store_login(settings, auth_server)
    tokens = build_token_provider(only_account(settings), settings)
    oauth_dovecot.add_message("alice", message(1))
    first = await poll(settings, tokens=tokens)
    assert first.ok, f"{first.error}\n{oauth_dovecot.log()}"
    assert auth_server.grants("refresh_token") == 1

    # The cached access token dies between polls (a daemon an hour later).
    auth_server.revoke_access_tokens()
    oauth_dovecot.add_message("alice", message(2))
    second = await poll(settings, tokens=tokens)
    assert second.ok, f"{second.error}\n{oauth_dovecot.log()}"
    assert second.delivered == 1
    # One refused AUTH with the stale token, one refresh, one accepted AUTH.
    assert auth_server.grants("refresh_token") == 2
    assert maildir_messages(tmp_path / "out") == sorted([message(1), message(2)])


async def test_revoked_login_fails_the_account_not_the_messages(
    oauth_dovecot: DovecotServer, auth_server: FakeAuthServer,
    make_settings: MakeSettings, tmp_path: Path,
) -> None:
    settings = _settings(make_settings, oauth_dovecot, auth_server, "oauthbearer")
    token_file = _store_login(settings, auth_server)
    tokens = build_token_provider(only_account(settings), settings)
    oauth_dovecot.add_message("alice", message(1))
    auth_server.refresh_tokens.clear()  # the user revoked popbox's access
    result = await poll(settings, tokens=tokens)
    assert not result.ok
    assert "invalid_grant" in str(result.error)
    assert token_file.load() is not None  # nothing was thrown away
    assert len(oauth_dovecot.stored_messages("alice")) == 1
