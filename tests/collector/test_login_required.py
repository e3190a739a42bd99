"""A dead OAuth login is loud: the run fails (no message is blamed), `popbox fetch`
and `--status` exit 3 and say which command signs in again, the daemon waits
``max_backoff``."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from popbox.collector.base import FetchedMessage
from popbox.collector.cli import EXIT_LOGIN_REQUIRED, EXIT_OK, fetch_command
from popbox.collector.config import FetchSettings, MaildirSinkSettings
from popbox.collector.poll import Poller
from popbox.collector.scheduler import next_delay
from popbox.collector.sinks.maildir import MaildirSink
from popbox.collector.state import StateDB
from popbox.collector.tokens import StaticTokenProvider, TokenProvider
from popbox.errors import OAuthLoginRequired, SinkUnavailable, TemporarySinkError
from support.dovecot import DovecotServer
from support.fakepop import FakePop
from support.fetch import (
    account_entry,
    crlf_message,
    only_account,
    poll,
    settings_for,
    tls_fields,
    write_fetch_config,
)
from support.oauth import CLIENT_ID, FakeAuthServer

FIX = "run `popbox oauth login fake`"


class DeadLogin:
    """A token provider whose stored login was revoked (what a refresh-token provider
    reports once the authorization server answers invalid_grant)."""

    async def token(self, *, force_refresh: bool = False) -> str:
        raise OAuthLoginRequired(f"the OAuth login of fake was revoked: {FIX}")


class SignedOutSink:
    """A sink whose own OAuth login is dead (an IMAP or Gmail sink's), raising it
    bare or wrapped in a SinkError, alone or for a batch."""

    def __init__(self, *, wrapped: bool) -> None:
        self.wrapped = wrapped
        self.calls = 0

    @property
    def name(self) -> str:
        return "signed-out"

    async def deliver(self, message: FetchedMessage) -> None:
        self.calls += 1
        error = OAuthLoginRequired(f"the sink's login was revoked: {FIX}")
        if not self.wrapped:
            raise error
        raise TemporarySinkError("signed-out: cannot log in") from error

    async def close(self) -> None:
        return None


class SignedOutBatchSink(SignedOutSink):
    async def deliver_batch(self, messages: Sequence[FetchedMessage]) -> None:
        await self.deliver(messages[0])


@pytest.fixture
async def fake() -> AsyncIterator[FakePop]:
    server = await FakePop([crlf_message(i) for i in range(1, 5)]).start()
    yield server
    await server.stop()


def oauth_settings(fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FetchSettings:
    return settings_for(
        fake,
        tmp_path,
        monkeypatch,
        auth="oauth2",
        password_env=None,
        oauth={"token_source": "command", "token_command": "unused"},
    )


async def test_a_dead_pop3_login_fails_the_run_and_is_remembered_until_a_success(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = oauth_settings(fake, tmp_path, monkeypatch)
    result = await poll(settings, tokens=DeadLogin())
    assert result.login_required
    assert FIX in (result.error or "")
    assert not any(c.startswith("RETR") for c in fake.commands)
    # The daemon waits max_backoff: retrying cannot help until someone signs in.
    delay = next_delay(only_account(settings), result, 1, settings, random.Random(1))
    assert delay >= settings.max_backoff * (1 - settings.jitter)
    db = StateDB(settings.state_db_path)
    try:
        [status] = await db.status(["fake"])
        assert status.login_required
        assert FIX in (status.last_error or "")
        fixed = await Poller(
            only_account(settings), settings, db, tokens=StaticTokenProvider("good-token")
        ).run()
        assert fixed.ok
        assert fixed.delivered == 4
        [status] = await db.status(["fake"])
        assert not status.login_required
    finally:
        db.close()


@pytest.mark.parametrize("batch", [False, True], ids=["alone", "batch"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
async def test_a_sink_whose_login_died_fails_the_run_not_the_messages(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: bool, wrapped: bool
) -> None:
    # One attempt: were the failure blamed on a message, it would go to quarantine.
    settings = settings_for(fake, tmp_path, monkeypatch, max_attempts=1, delete="after_delivery")
    sink = (SignedOutBatchSink if batch else SignedOutSink)(wrapped=wrapped)
    result = await poll(settings, sinks=[sink])
    assert result.login_required
    assert FIX in (result.error or "")
    assert (result.delivered, result.quarantined, result.failed) == (0, 0, 0)
    assert sink.calls == 1  # the first failure ends the run
    assert fake.deleted == set()
    # Signed in again (here: a sink that works), every message flows.
    maildir = MaildirSink(MaildirSinkSettings(kind="maildir", path=tmp_path / "out"))
    again = await poll(settings, sinks=[maildir])
    assert again.ok
    assert again.delivered == 4
    assert len(fake.deleted) == 4


class UnreachableSink(SignedOutSink):
    """A sink whose server refuses everything for now (a permission missing, down)."""

    async def deliver(self, message: FetchedMessage) -> None:
        self.calls += 1
        raise SinkUnavailable("unreachable: 403 insufficient authentication scopes")


async def test_a_sink_that_takes_nothing_fails_the_run_and_no_message_is_quarantined(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(fake, tmp_path, monkeypatch, max_attempts=1, delete="after_delivery")
    sink = UnreachableSink(wrapped=False)
    result = await poll(settings, sinks=[sink])
    assert not result.ok
    assert not result.login_required
    assert "insufficient authentication scopes" in (result.error or "")
    assert (result.delivered, result.quarantined) == (0, 0)
    assert sink.calls == 1
    assert fake.deleted == set()


def test_status_exits_3_and_names_the_fix_until_a_poll_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def poll_once(tokens: TokenProvider) -> None:
        server = await FakePop([crlf_message(1)]).start()
        try:
            await poll(oauth_settings(server, tmp_path, monkeypatch), tokens=tokens)
        finally:
            await server.stop()

    config = write_fetch_config(
        tmp_path / "popbox.toml",
        {
            "name": "fake",
            "host": "127.0.0.1",
            "username": "u",
            "auth": "oauth2",
            "oauth": {"token_source": "command", "token_command": "unused"},
            "sinks": [{"kind": "maildir", "path": str(tmp_path / "out")}],
        },
        state_dir=tmp_path / "state",
    )
    status = ["--config", str(config), "--status"]
    monkeypatch.setenv("COLUMNS", "250")  # the table's cells unwrapped
    asyncio.run(poll_once(DeadLogin()))
    shown = CliRunner().invoke(fetch_command, status)
    assert shown.exit_code == EXIT_LOGIN_REQUIRED
    assert "LOGIN NEEDED" in shown.output
    assert f"LOGIN NEEDED: the OAuth login of fake was revoked: {FIX}" in shown.output
    asyncio.run(poll_once(StaticTokenProvider("good-token")))
    shown = CliRunner().invoke(fetch_command, status)
    assert shown.exit_code == EXIT_OK
    assert "LOGIN NEEDED" not in shown.output


@pytest.mark.interop
def test_fetch_exits_3_when_the_stored_refresh_token_was_revoked(
    dovecot: DovecotServer, tls_files: Any, auth_server: FakeAuthServer, tmp_path: Path
) -> None:
    store = tmp_path / "alice.json"
    store.write_text(json.dumps({"refresh_token": "rt-revoked"}))
    account = account_entry(
        dovecot.pop3s_port,
        tmp_path / "out",
        **tls_fields(tls_files.ca),
        auth="oauth2",
        password_env=None,
        oauth={
            "token_source": "refresh_token",
            "provider": "generic",
            "client_id": CLIENT_ID,
            "token_endpoint": f"{auth_server.url}/token",
            "token_store": str(store),
        },
    )
    config = write_fetch_config(tmp_path / "popbox.toml", account, state_dir=tmp_path / "state")
    result = CliRunner().invoke(fetch_command, ["--config", str(config)])
    assert "popbox oauth login" in result.output
    assert result.exit_code == EXIT_LOGIN_REQUIRED
    shown = CliRunner().invoke(fetch_command, ["--config", str(config), "--status"])
    assert "LOGIN NEEDED" in shown.output
    assert shown.exit_code == EXIT_LOGIN_REQUIRED
