"""The Gmail sink against a local Gmail API (tests/support/gmailapi.py) over verified TLS.

Labels, query parameters, multipart and resumable uploads, Google's error answers,
token refresh, and the look-up that keeps a repeated attempt from importing twice;
then the whole path through the poll engine and `popbox fetch` from a real Dovecot.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.base import FetchedMessage
from popbox.collector.config import GmailSinkSettings
from popbox.collector.oauth import TokenFile
from popbox.collector.sinks import SinkContext, build_sink
from popbox.collector.sinks.gmail import GmailSink
from popbox.collector.sinks.message_head import popbox_id
from popbox.collector.tokens import StaticTokenProvider
from popbox.errors import (
    ConfigError,
    OAuthLoginRequired,
    PermanentSinkError,
    SinkUnavailable,
    TemporarySinkError,
)
from support.dovecot import DovecotServer
from support.fetch import (
    MakeSettings,
    account_entry,
    fetch_settings,
    fetch_toml,
    message,
    poll,
    run_fetch,
    tls_fields,
)
from support.gmailapi import TOKEN, GmailApi, gmail_sink_toml, serve_gmail, sink_table
from support.oauth import CLIENT_ID, FakeAuthServer


@pytest.fixture
def gmail(server_context: ssl.SSLContext) -> Iterator[GmailApi]:
    yield from serve_gmail(GmailApi(), server_context)


def make_sink(
    gmail: GmailApi, tls_files: Any, *tokens: str, **fields: Any
) -> tuple[GmailSink, StaticTokenProvider]:
    settings = GmailSinkSettings.model_validate(sink_table(gmail, tls_files.ca, **fields))
    provider = StaticTokenProvider(*(tokens or (TOKEN,)))
    return GmailSink(settings, provider, backoff_initial=0.01), provider


def fetched(raw: bytes, uidl: str = "u1", attempt: int = 1) -> FetchedMessage:
    return FetchedMessage(
        "alice",
        uidl,
        len(raw),
        hashlib.sha256(raw).hexdigest(),
        Path("/nonexistent"),
        data=raw,
        attempt=attempt,
    )


def mail(index: int, extra: bytes = b"") -> bytes:
    return message(index, extra).replace(b"\n", b"\r\n")


DATED = (
    b"From: a@example.com\r\nDate: Tue, 01 Dec 2026 10:20:30 +0100\r\n"
    b"Message-ID: <dated@example.com>\r\nSubject: dated\r\n\r\nbody\r\n"
)


async def test_labels_are_created_once_and_applied_with_the_query_parameters(
    gmail: GmailApi, tls_files: Any
) -> None:
    receipts = gmail.add_user_label("Receipts")
    sink, _ = make_sink(
        gmail,
        tls_files,
        labels=["INBOX", "unread", "receipts", "Work/Popbox"],
        never_mark_spam=True,
        process_for_calendar=True,
    )
    try:
        await sink.deliver(fetched(DATED, "u1"))
        await sink.deliver(fetched(mail(2), "u2"))
    finally:
        await sink.close()
    assert gmail.calls("GET", "/labels") == 1
    assert gmail.calls("POST", "/labels") == 1
    [work] = [label for label in gmail.labels.values() if label["name"] == "Work/Popbox"]
    assert work["type"] == "user"
    assert (work["labelListVisibility"], work["messageListVisibility"]) == ("labelShow", "show")
    stored = sorted(gmail.messages.values(), key=lambda m: m.id)
    assert len(stored) == 2
    for item in stored:
        assert item.label_ids == ["INBOX", "UNREAD", receipts, work["id"]]
        assert item.params == {
            "uploadType": "multipart",
            "internalDateSource": "dateHeader",
            "neverMarkSpam": "true",
            "processForCalendar": "true",
        }
    # dateHeader: Gmail files the message under its Date, not under the import time.
    assert stored[0].internal_date == 1796116830000
    assert stored[0].raw == f"X-Popbox-Id: {popbox_id(fetched(DATED))}\r\n".encode() + DATED


async def test_a_label_created_meanwhile_by_another_client_is_used(
    gmail: GmailApi, tls_files: Any
) -> None:
    gmail.fail(
        "labels",
        status=409,
        reason="duplicate",
        message="Label name exists",
        match=b"Team",
        then=lambda: gmail.add_user_label("Team"),
    )
    sink, _ = make_sink(gmail, tls_files, labels=["Team"])
    try:
        await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    [team] = [label for label in gmail.labels.values() if label["name"] == "Team"]
    [stored] = gmail.messages.values()
    assert stored.label_ids == [team["id"]]
    assert gmail.calls("GET", "/labels") == 2


@pytest.mark.parametrize("label", ["DRAFT", "chat"])
def test_labels_gmail_cannot_import_into_are_a_config_error(
    gmail: GmailApi, tls_files: Any, tmp_path: Path, label: str
) -> None:
    table = sink_table(gmail, tls_files.ca, labels=["INBOX", label])
    with pytest.raises(ConfigError, match=f"Gmail cannot import into {label.upper()}"):
        fetch_settings(tmp_path, account_entry(110, tmp_path / "x", sinks=[table]))


async def test_big_message_goes_resumable_and_resumes_where_the_server_stopped(
    gmail: GmailApi, tls_files: Any
) -> None:
    big = mail(1, (b"z" * 998 + b"\n") * 6000)
    assert len(big) > 5 * 1024 * 1024
    # The connection breaks after 1 MiB of the bytes arrived.
    gmail.fail("upload", "cut", after_bytes=1024 * 1024)
    sink, _ = make_sink(gmail, tls_files, identify="message_id")
    try:
        await sink.deliver(fetched(big))
    finally:
        await sink.close()
    [stored] = gmail.messages.values()
    assert stored.raw == big
    assert stored.params["uploadType"] == "resumable"
    assert stored.label_ids == ["INBOX", "UNREAD"]
    # The first PUT broke, a status query, then the rest with a Content-Range.
    assert gmail.calls("PUT", "/upload/sessions/") == 3
    assert gmail.calls("POST", "/upload/") == 1


async def test_an_upload_whose_answer_is_lost_is_not_sent_again(
    gmail: GmailApi, tls_files: Any
) -> None:
    big = mail(1, b"q" * (6 * 1024 * 1024))
    gmail.fail("upload", "drop")
    sink, _ = make_sink(gmail, tls_files)
    try:
        await sink.deliver(fetched(big))
    finally:
        await sink.close()
    assert len(gmail.messages) == 1
    assert gmail.calls("PUT", "/upload/sessions/") == 2  # the bytes, the status query


async def test_rate_limits_and_server_errors_are_retried(gmail: GmailApi, tls_files: Any) -> None:
    gmail.fail("import", status=429, reason="rateLimitExceeded", retry_after="0", times=2)
    gmail.fail(
        "import", status=403, reason="userRateLimitExceeded", message="User Rate Limit Exceeded"
    )
    gmail.fail("import", status=500)
    gmail.fail("labels", status=503, retry_after="0")
    sink, _ = make_sink(gmail, tls_files)
    try:
        await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    assert len(gmail.messages) == 1
    assert gmail.calls("POST", "/upload/") == 5
    # After the 500 the import may have happened: the sink looked before trying again.
    assert gmail.calls("GET", "/messages") == 1


async def test_rate_limits_past_retry_for_are_a_temporary_failure(
    gmail: GmailApi, tls_files: Any
) -> None:
    gmail.fail("import", status=429, retry_after="0", times=10**6)
    sink, _ = make_sink(gmail, tls_files, retry_for=0.3)
    try:
        with pytest.raises(TemporarySinkError, match="HTTP 429") as caught:
            await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    # The message's failure, counted towards max_attempts; not the mailbox's.
    assert not isinstance(caught.value, SinkUnavailable)
    assert gmail.messages == {}


async def test_a_retry_after_beyond_retry_for_is_not_waited_for(
    gmail: GmailApi, tls_files: Any
) -> None:
    gmail.fail("import", status=429, retry_after="3600")
    sink, _ = make_sink(gmail, tls_files)
    try:
        with pytest.raises(TemporarySinkError, match="1 try"):
            await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()


async def test_an_expired_token_is_refreshed_once(gmail: GmailApi, tls_files: Any) -> None:
    sink, provider = make_sink(gmail, tls_files, "expired-token", TOKEN)
    try:
        await sink.deliver(fetched(mail(1), "u1"))
        await sink.deliver(fetched(mail(2), "u2"))
    finally:
        await sink.close()
    assert provider.refreshes == 1
    assert len(gmail.messages) == 2


async def test_a_token_refused_after_refresh_makes_the_sink_unavailable_without_the_token(
    gmail: GmailApi, tls_files: Any
) -> None:
    sink, provider = make_sink(gmail, tls_files, "dead-token-1", "dead-token-2")
    try:
        with pytest.raises(SinkUnavailable, match="sign in again") as caught:
            await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    assert provider.refreshes == 1
    assert "popbox oauth login ACCOUNT --sink gmail:me" in str(caught.value)
    assert "dead-token" not in str(caught.value)


async def test_missing_scopes_are_named(gmail: GmailApi, tls_files: Any) -> None:
    gmail.fail(
        "labels",
        status=403,
        reason="insufficientPermissions",
        message="Request had insufficient authentication scopes.",
    )
    sink, _ = make_sink(gmail, tls_files)
    try:
        with pytest.raises(SinkUnavailable, match=r"gmail\.insert") as caught:
            await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    assert "insufficient authentication scopes" in str(caught.value)


@pytest.mark.parametrize(
    ("endpoint", "status", "reason", "error"),
    [
        ("import", 403, "domainPolicy", "Gmail forbids importing"),
        ("import", 403, "insufficientPermissions", "lacks a scope for importing"),
        # Creating the label is refused: no message can be given it.
        ("labels", 400, "invalidArgument", "Gmail refused creating label 'New label'"),
    ],
)
async def test_a_refused_mailbox_makes_the_sink_unavailable(
    gmail: GmailApi, tls_files: Any, endpoint: str, status: int, reason: str, error: str
) -> None:
    # A label fault only for the POST that creates it (the GET has no body).
    only = b"New label" if endpoint == "labels" else None
    gmail.fail(endpoint, status=status, reason=reason, message="Refused", match=only)
    sink, _ = make_sink(gmail, tls_files, labels=["INBOX", "New label"])
    try:
        with pytest.raises(SinkUnavailable, match=error):
            await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    assert gmail.messages == {}


class DeadLogin:
    """A token provider whose stored login was revoked."""

    async def token(self, *, force_refresh: bool = False) -> str:
        raise OAuthLoginRequired("the sink's login was revoked: popbox oauth login")


async def test_a_dead_login_passes_through_as_login_required(
    gmail: GmailApi, tls_files: Any
) -> None:
    settings = GmailSinkSettings.model_validate(sink_table(gmail, tls_files.ca))
    sink = GmailSink(settings, DeadLogin())
    try:
        with pytest.raises(OAuthLoginRequired, match="revoked"):
            await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    assert gmail.requests == []


def test_the_settings_default_to_google_and_a_timeout_above_retry_for(
    gmail: GmailApi, tls_files: Any
) -> None:
    table = sink_table(gmail, tls_files.ca)
    del table["oauth"]["provider"]
    settings = GmailSinkSettings.model_validate(table)
    assert settings.oauth is not None
    assert settings.oauth.provider == "google"
    assert (settings.timeout, settings.retry_for) == (180.0, 120.0)
    assert settings.timeout > settings.retry_for


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"timeout": 60}, r"timeout \(60 s\) must exceed retry_for \(120 s\)"),
        ({"timeout": 30, "retry_for": 30}, "must exceed retry_for"),
        (
            {"oauth": {"token_source": "command", "token_command": "x", "provider": "microsoft"}},
            'oauth.provider must be "google"',
        ),
    ],
)
def test_settings_the_gmail_sink_refuses(
    gmail: GmailApi, tls_files: Any, tmp_path: Path, fields: dict[str, Any], error: str
) -> None:
    table = sink_table(gmail, tls_files.ca, **fields)
    with pytest.raises(ConfigError, match=error):
        fetch_settings(tmp_path, account_entry(110, tmp_path / "x", sinks=[table]))


async def test_a_refused_message_is_a_permanent_failure(gmail: GmailApi, tls_files: Any) -> None:
    sink, _ = make_sink(gmail, tls_files, identify="message_id")
    try:
        with pytest.raises(PermanentSinkError, match="Invalid message"):
            await sink.deliver(fetched(b"\r\nno header at all\r\n"))
        gmail.fail("import", status=413, message="Request Entity Too Large")
        with pytest.raises(PermanentSinkError, match="413"):
            await sink.deliver(fetched(mail(2)))
    finally:
        await sink.close()


async def test_an_import_whose_answer_is_lost_is_found_not_repeated(
    gmail: GmailApi, tls_files: Any
) -> None:
    gmail.fail("import", "drop")
    sink, _ = make_sink(gmail, tls_files)
    try:
        await sink.deliver(fetched(mail(1)))
    finally:
        await sink.close()
    assert len(gmail.messages) == 1
    assert gmail.calls("POST", "/upload/") == 1


@pytest.mark.parametrize("identify", ["header", "message_id"])
async def test_a_later_attempt_finds_the_message_and_skips_it(
    gmail: GmailApi, tls_files: Any, identify: str
) -> None:
    # The import happened, then the collector was killed before recording it.
    sink, _ = make_sink(gmail, tls_files, identify=identify)
    try:
        await sink.deliver(fetched(DATED, attempt=1))
        await sink.deliver(fetched(DATED, attempt=2))
        # Not yet there: a later attempt of another message still imports it.
        await sink.deliver(fetched(mail(5), "u5", attempt=3))
    finally:
        await sink.close()
    assert gmail.calls("POST", "/upload/") == 2
    # Each later attempt searched by Message-ID; the one found was confirmed by its
    # X-Popbox-Id (header) or its internal date (message_id).
    assert gmail.calls("GET", "/messages") == 3
    assert len(gmail.messages) == 2
    if identify == "message_id":
        assert gmail.raw_messages() == sorted([DATED, mail(5)])


async def test_header_mode_tells_apart_two_messages_with_one_message_id(
    gmail: GmailApi, tls_files: Any
) -> None:
    # A mailing-list copy and a direct copy share the Message-ID, not the bytes.
    other = DATED.replace(b"body", b"the list's copy")
    sink, _ = make_sink(gmail, tls_files)
    try:
        await sink.deliver(fetched(DATED, "u1"))
        await sink.deliver(fetched(other, "u2", attempt=2))
    finally:
        await sink.close()
    assert len(gmail.messages) == 2


async def test_a_message_without_message_id_gets_one_it_can_be_found_by(
    gmail: GmailApi, tls_files: Any
) -> None:
    raw = b"From: a@example.com\r\nSubject: no id\r\n\r\nbody\r\n"
    sink, _ = make_sink(gmail, tls_files)
    try:
        await sink.deliver(fetched(raw))
        await sink.deliver(fetched(raw, attempt=2))
    finally:
        await sink.close()
    [stored] = gmail.messages.values()
    marker = popbox_id(fetched(raw))
    assert stored.raw == (
        f"X-Popbox-Id: {marker}\r\nMessage-ID: <popbox.{marker}@popbox.invalid>\r\n".encode() + raw
    )


# ------------------------------------------------------------ through the poll engine


@pytest.mark.interop
async def test_a_message_gmail_refuses_is_quarantined_and_the_rest_imported(
    dovecot: DovecotServer, gmail: GmailApi, make_settings: MakeSettings, tls_files: Any
) -> None:
    for index in range(4):
        dovecot.add_message("alice", message(index))
    gmail.fail(
        "import", status=400, message="Invalid To header", match=b"Subject: message 1", times=10
    )
    settings = make_settings(dovecot, sinks=[sink_table(gmail, tls_files.ca)])
    result = await poll(settings)
    assert result.ok, result.error
    assert (result.delivered, result.quarantined) == (3, 1)
    [quarantined] = (settings.quarantine_path / "alice").glob("*.eml")
    assert b"Subject: message 1" in quarantined.read_bytes()
    reason = quarantined.with_name(quarantined.name[:-4] + ".reason").read_text()
    assert "Invalid To header" in reason
    assert len(gmail.messages) == 3

    again = await poll(settings)
    assert again.ok, again.error
    assert again.delivered == 0
    assert len(gmail.messages) == 3


@pytest.mark.interop
async def test_missing_scopes_fail_the_run_and_quarantine_nothing(
    dovecot: DovecotServer, gmail: GmailApi, make_settings: MakeSettings, tls_files: Any
) -> None:
    for index in range(3):
        dovecot.add_message("alice", message(index))
    gmail.fail(
        "import",
        status=403,
        reason="insufficientPermissions",
        message="Request had insufficient authentication scopes.",
        times=10,
    )
    settings = make_settings(
        dovecot, sinks=[sink_table(gmail, tls_files.ca)], max_attempts=1, delete="after_delivery"
    )
    result = await poll(settings)
    assert not result.ok
    assert not result.login_required
    assert "insufficient authentication scopes" in (result.error or "")
    assert (result.delivered, result.quarantined) == (0, 0)
    # The run stopped at the first refusal: one import asked, none after it.
    assert gmail.calls("POST", "/upload/") == 1
    assert not (settings.quarantine_path / "alice").exists()
    assert len(dovecot.stored_messages("alice")) == 3

    # Signed in with the scopes: the next run imports all three.
    gmail.faults.clear()
    again = await poll(settings)
    assert again.ok, again.error
    assert again.delivered == 3
    assert len(gmail.messages) == 3


@pytest.mark.interop
def test_popbox_fetch_moves_a_dovecot_mailbox_into_gmail(
    dovecot: DovecotServer, gmail: GmailApi, tls_files: Any, tmp_path: Path
) -> None:
    bodies = [message(index) for index in range(5)]
    for body in bodies:
        dovecot.add_message("alice", body)
    config = tmp_path / "popbox.toml"
    entry = account_entry(
        dovecot.pop3s_port, tmp_path / "unused", **tls_fields(tls_files.ca), delete="after_delivery"
    )
    del entry["sinks"]
    config.write_text(
        fetch_toml(entry, state_dir=str(tmp_path / "state"))
        + gmail_sink_toml(gmail, tls_files.ca, labels=["INBOX", "From POP3"])
    )
    log: list[bytes] = []
    assert run_fetch(config, None, log) == 0, log[-1].decode(errors="replace")[-2000:]
    assert dovecot.stored_messages("alice") == []
    stored = list(gmail.messages.values())
    assert len(stored) == 5
    for item in stored:
        assert gmail.label_names(item) == ["INBOX", "From POP3"]
        first, _, rest = item.raw.partition(b"\r\n")
        assert first.startswith(b"X-Popbox-Id: ")
        assert rest.replace(b"\r\n", b"\n") in bodies


async def test_an_unsearchable_message_id_is_kept_and_no_second_one_added(
    gmail: GmailApi, tls_files: Any
) -> None:
    raw = b"From: a@example.com\r\nMessage-ID: <two words@example.com>\r\n\r\nbody\r\n"
    sink, _ = make_sink(gmail, tls_files)
    try:
        await sink.deliver(fetched(raw))
    finally:
        await sink.close()
    [stored] = gmail.messages.values()
    assert stored.raw == f"X-Popbox-Id: {popbox_id(fetched(raw))}\r\n".encode() + raw


async def test_a_stored_login_is_refreshed_when_gmail_stops_taking_its_token(
    auth_server: FakeAuthServer, tls_files: Any, server_context: ssl.SSLContext, tmp_path: Path
) -> None:
    for api in serve_gmail(GmailApi(tokens=set(), auth=auth_server), server_context):
        store = tmp_path / "gmail-login.json"
        TokenFile(store).save({"refresh_token": auth_server.issue("alice")["refresh_token"]})
        oauth = {
            "token_source": "refresh_token",
            "provider": "generic",
            "client_id": CLIENT_ID,
            "token_endpoint": f"{auth_server.url}/token",
            "token_store": str(store),
        }
        table = sink_table(api, tls_files.ca, oauth=oauth)
        settings = fetch_settings(tmp_path, account_entry(110, tmp_path / "x", sinks=[table]))
        [account] = settings.accounts
        sink = build_sink(account.sinks[0], SinkContext(account, settings))
        try:
            await sink.deliver(fetched(mail(1), "u1"))
            auth_server.revoke_access_tokens()  # what expiry looks like from outside
            await sink.deliver(fetched(mail(2), "u2"))
        finally:
            await sink.close()
        assert len(api.messages) == 2
        assert auth_server.grants("refresh_token") == 2
