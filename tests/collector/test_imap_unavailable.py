"""An IMAP destination that takes nothing for now stops the run and blames no message.

A refused login, a server that cannot be reached, a folder that is missing: with
``max_attempts = 1`` any failure counted against a message would quarantine it at
once, so these polls show that none is counted. The messages stay on the POP3 server
(a fake one, deleting after delivery) and flow once the mailbox is put right. Bob's
mailbox is on a real Dovecot.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from popbox.collector.config import FetchSettings
from popbox.collector.oauth import TokenFile
from popbox.errors import ConfigError
from support.dovecot import DovecotServer, imap_skip_reason, start_dovecot
from support.fakepop import FakePop
from support.fetch import account_entry, crlf_message, fetch_settings, poll, settings_for
from support.oauth import CLIENT_ID, FakeAuthServer

BOB_PASSWORD = "bob-pa55"
BOB_PASSWORD_ENV = "POPBOX_TEST_UNAVAILABLE_IMAP_PASSWORD"
MESSAGES = 4


@pytest.fixture
def bob(tls_files: Any, shared_tmp: Path) -> Iterator[DovecotServer]:
    """A private Dovecot with bob's IMAP mailbox, the destination."""
    reason = imap_skip_reason()
    if reason:
        pytest.skip(reason)
    server = start_dovecot(shared_tmp / "dovecot", tls_files.cert, tls_files.key)
    server.add_user("bob", BOB_PASSWORD)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def fake() -> AsyncIterator[FakePop]:
    server = await FakePop([crlf_message(i) for i in range(1, MESSAGES + 1)]).start()
    yield server
    await server.stop()


def imap_sink(port: int, tls_files: Any, **fields: Any) -> dict[str, Any]:
    """An IMAP sink into bob's mailbox on 127.0.0.1:``port`` (implicit TLS)."""
    entry: dict[str, Any] = {
        "kind": "imap",
        "host": "127.0.0.1",
        "port": port,
        "ca_file": str(tls_files.ca),
        "tls_server_name": "localhost",
        "username": "bob",
        "password_env": BOB_PASSWORD_ENV,
    }
    entry.update(fields)
    return entry


def one_attempt(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink: dict[str, Any]
) -> FetchSettings:
    """Settings where one failed attempt would quarantine a message."""
    return settings_for(
        fake, tmp_path, monkeypatch, max_attempts=1, delete="after_delivery", sinks=[sink]
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.interop
async def test_a_wrong_password_stops_the_run_and_the_right_one_lets_everything_through(
    bob: DovecotServer,
    fake: FakePop,
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = one_attempt(fake, tmp_path, monkeypatch, imap_sink(bob.imaps_port, tls_files))
    monkeypatch.setenv(BOB_PASSWORD_ENV, "an-0ld-password")
    refused = await poll(settings)
    assert not refused.ok
    assert not refused.login_required
    assert "login as bob refused" in (refused.error or "")
    assert "an-0ld-password" not in (refused.error or "")
    assert (refused.delivered, refused.quarantined, refused.failed) == (0, 0, 0)
    assert fake.deleted == set()
    assert bob.folder_messages("bob") == []
    monkeypatch.setenv(BOB_PASSWORD_ENV, BOB_PASSWORD)
    fixed = await poll(settings)
    assert fixed.ok, fixed.error
    assert (fixed.delivered, fixed.quarantined) == (MESSAGES, 0)
    assert len(bob.folder_messages("bob")) == MESSAGES
    assert len(fake.deleted) == MESSAGES


async def test_an_unreachable_server_stops_the_run_and_quarantines_nothing(
    fake: FakePop, tls_files: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BOB_PASSWORD_ENV, BOB_PASSWORD)
    settings = one_attempt(fake, tmp_path, monkeypatch, imap_sink(closed_port(), tls_files))
    result = await poll(settings)
    assert not result.ok
    assert "cannot connect to 127.0.0.1" in (result.error or "")
    assert (result.delivered, result.quarantined, result.failed) == (0, 0, 0)
    assert fake.deleted == set()


@pytest.mark.interop
async def test_a_missing_folder_without_create_folder_waits_until_it_exists(
    bob: DovecotServer,
    fake: FakePop,
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(BOB_PASSWORD_ENV, BOB_PASSWORD)
    sink = imap_sink(bob.imaps_port, tls_files, folder="Archive", create_folder=False)
    settings = one_attempt(fake, tmp_path, monkeypatch, sink)
    missing = await poll(settings)
    assert not missing.ok
    assert "'Archive' does not exist" in (missing.error or "")
    assert (missing.delivered, missing.quarantined, missing.failed) == (0, 0, 0)
    assert fake.deleted == set()
    with IMAPClient("127.0.0.1", port=bob.imap_port, ssl=False) as client:
        client.starttls(ssl.create_default_context(cafile=str(tls_files.ca)))
        client.login("bob", BOB_PASSWORD)
        client.create_folder("Archive")
    there = await poll(settings)
    assert there.ok, there.error
    assert len(bob.folder_messages("bob", "Archive")) == MESSAGES
    assert len(fake.deleted) == MESSAGES


@pytest.mark.interop
async def test_a_revoked_sink_login_asks_for_a_new_sign_in_and_blames_no_message(
    bob: DovecotServer,
    fake: FakePop,
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    auth_server: FakeAuthServer,
) -> None:
    sink = imap_sink(
        bob.imaps_port,
        tls_files,
        name="bob",
        auth="oauth2",
        password_env=None,
        oauth={
            "token_source": "refresh_token",
            "provider": "generic",
            "client_id": CLIENT_ID,
            "token_endpoint": f"{auth_server.url}/token",
        },
    )
    settings = one_attempt(fake, tmp_path, monkeypatch, sink)
    [account] = settings.accounts
    store = settings.sink_token_store(account, account.sinks[0])
    TokenFile(store).save({"refresh_token": auth_server.issue("bob")["refresh_token"]})
    auth_server.refresh_tokens.clear()  # the user revoked popbox's access
    result = await poll(settings)
    assert result.login_required
    assert "popbox oauth login fake --sink bob" in (result.error or "")
    assert (result.delivered, result.quarantined, result.failed) == (0, 0, 0)
    assert fake.deleted == set()


def test_an_oauth_token_over_plaintext_is_refused_when_the_config_is_loaded(
    tmp_path: Path,
) -> None:
    sink = {
        "kind": "imap",
        "host": "imap.example.com",
        "security": "none",
        "username": "bob",
        "auth": "oauth2",
        "oauth": {"token_source": "command", "token_command": "print-token"},
    }
    account = account_entry(110, tmp_path / "out", sinks=[sink])
    with pytest.raises(ConfigError, match='OAuth2 token over security = "none" needs allow_plain'):
        fetch_settings(tmp_path, account)
    allowed = account_entry(
        110, tmp_path / "out", sinks=[sink | {"allow_plaintext_password": True}]
    )
    [loaded] = fetch_settings(tmp_path, allowed).accounts
    assert loaded.sinks[0].kind == "imap"
