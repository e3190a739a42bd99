"""The collector against a scripted fake server: missing and duplicate UIDLs, STLS that
fails (no plaintext fallback), login response codes, XOAUTH2 with an expired token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from popbox.collector.tokens import StaticTokenProvider
from popbox.errors import ConfigError
from support.fakepop import FakePop
from support.fetch import crlf_message, maildir_messages, poll, settings_for
from support.wire import lf


@pytest.fixture
async def fake() -> AsyncIterator[FakePop]:
    server = await FakePop([crlf_message(i) for i in range(1, 5)]).start()
    yield server
    await server.stop()


@pytest.mark.parametrize("mode", ["missing", "duplicate", "invalid"])
async def test_untrustworthy_uidls_fall_back_to_header_hashes(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    fake.uidl = mode
    settings = settings_for(fake, tmp_path, monkeypatch)
    first = await poll(settings)
    assert first.ok, first.error
    assert first.delivered == 4
    assert any("header-hash" in note for note in first.notes)
    # The header hashes are stable: the next run recognises every message.
    second = await poll(settings)
    assert (second.delivered, second.pending) == (0, 0)
    assert maildir_messages(tmp_path / "out") == sorted(lf(m) for m in fake.messages)


async def test_stls_refused_never_falls_back_to_plaintext(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.capabilities.append("STLS")
    settings = settings_for(fake, tmp_path, monkeypatch, security="starttls")
    result = await poll(settings)
    assert not result.ok
    assert "not falling back" in (result.error or "")
    assert not any(c.startswith(("USER", "PASS", "AUTH")) for c in fake.commands)


async def test_stls_not_offered_is_refused(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = await poll(settings_for(fake, tmp_path, monkeypatch, security="starttls"))
    assert not result.ok
    assert "STLS" not in fake.commands
    assert not any(c.startswith(("USER", "PASS")) for c in fake.commands)


async def test_stls_handshake_failure_is_fatal(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake says +OK but then never speaks TLS: the handshake fails.
    fake.capabilities.append("STLS")
    fake.stls_reply = b"+OK go ahead"
    settings = settings_for(fake, tmp_path, monkeypatch, security="starttls", connect_timeout=2)
    result = await poll(settings)
    assert not result.ok
    assert not any(c.startswith(("USER", "PASS", "AUTH")) for c in fake.commands)


def test_password_over_plaintext_needs_explicit_opt_in(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="allow_plaintext_password"):
        settings_for(fake, tmp_path, monkeypatch, allow_plaintext_password=False)


@pytest.mark.parametrize("code", ["IN-USE", "LOGIN-DELAY", "SYS/TEMP"])
async def test_login_response_codes_reach_the_result(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    fake.login_error = f"-ERR [{code}] not now".encode()
    result = await poll(settings_for(fake, tmp_path, monkeypatch, auth_mechanism="user"))
    assert not result.ok
    assert result.error_code == code


async def test_xoauth2_refreshes_an_expired_token_and_reauthenticates(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(
        fake,
        tmp_path,
        monkeypatch,
        auth="oauth2",
        password_env=None,
        oauth={"token_source": "command", "token_command": "unused"},
    )
    tokens = StaticTokenProvider("expired-token", "good-token")
    result = await poll(settings, tokens=tokens)
    assert result.ok, result.error
    assert tokens.refreshes == 1
    assert result.delivered == 4
    # Two-step form: "AUTH XOAUTH2" alone, then the token on its own line.
    assert fake.commands.count("AUTH XOAUTH2") == 2


async def test_endless_body_is_cut_off(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.oversize_body = True
    result = await poll(settings_for(fake, tmp_path, monkeypatch))
    assert not result.ok
    assert "runs past" in (result.error or "")
    assert not list((tmp_path / "state" / "spool").rglob("retr-*"))


async def test_delete_only_after_delivery_and_header_filter(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(
        fake,
        tmp_path,
        monkeypatch,
        delete="after_delivery",
        filters=[{"header": "Subject", "pattern": "fake 2", "action": "skip"}],
    )
    result = await poll(settings)
    assert result.ok, result.error
    assert (result.delivered, result.skipped) == (3, 1)
    assert fake.deleted == {1, 3, 4}
    assert not any(c.startswith("RETR 2") for c in fake.commands)


async def test_inaccurate_list_sizes_do_not_cause_redelivery(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.list_size_offset = -3
    settings = settings_for(fake, tmp_path, monkeypatch)
    assert (await poll(settings)).delivered == 4
    again = await poll(settings)
    assert (again.delivered, again.notes) == (0, [])
    assert len(maildir_messages(tmp_path / "out")) == 4


async def test_changing_uidls_fall_back_to_headers_without_redelivery(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.messages = [crlf_message(i) + b"x" * (100 * i) + b"\r\n" for i in range(1, 5)]
    settings = settings_for(fake, tmp_path, monkeypatch)
    assert (await poll(settings)).delivered == 4
    # The server now hands out the UIDLs of other messages (a "changing UIDL" server):
    # uid-2 names a message of another size. The collector notices, switches to header
    # hashes and recognises the messages it delivered under their old UIDLs.
    fake.uid_shift = 1
    changed = await poll(settings)
    assert any("changed size" in note for note in changed.notes)
    assert (changed.delivered, changed.pending) == (0, 0)
    fake.messages.append(crlf_message(7))
    newer = await poll(settings)
    assert newer.delivered == 1
    assert len(maildir_messages(tmp_path / "out")) == 5


async def test_apop_sends_the_rfc1939_digest(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from popbox.proto.sasl import apop_digest

    result = await poll(settings_for(fake, tmp_path, monkeypatch, auth_mechanism="apop"))
    assert result.ok, result.error
    assert f"APOP alice {apop_digest('<1.2@fake>', 'secret')}" in fake.commands


async def test_delete_after_days(
    fake: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    settings = settings_for(
        fake, tmp_path, monkeypatch, delete="after_days", delete_after_days=7
    )
    assert (await poll(settings)).deleted == 0
    raw = sqlite3.connect(settings.state_db_path)
    with raw:
        raw.execute(
            "UPDATE messages SET delivered_at = delivered_at - 8 * 86400 WHERE uid = 'uid-2'"
        )
    raw.close()
    result = await poll(settings)
    assert (result.delivered, result.deleted) == (0, 1)
    assert fake.deleted == {2}
