"""WebhookSink against a real HTTP server on 127.0.0.1 that checks every signature."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popbox.collector.base import FetchedMessage
from popbox.collector.sinks.webhook import WebhookSink, build_payload, encode_payload
from popbox.errors import PermanentSinkError, TemporarySinkError
from support.ports import free_port
from support.webhook import SECRET, Receiver, Reply, serve


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from serve(Receiver())


def _realistic_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = '"Zoë Müller" <zoe@example.org>'
    msg["To"] = "Support <support@example.com>, ops@example.com"
    msg["Cc"] = "=?utf-8?q?J=C3=BCrgen?= <juergen@example.net>"
    msg["Subject"] = "=?iso-8859-1?q?Fehler_beim_L=F6schen?= =?utf-8?b?4pyT?="
    msg["Date"] = "Tue, 24 Nov 2026 10:15:00 +0100"
    msg["Message-ID"] = "<abc123@example.org>"
    msg["In-Reply-To"] = "<prev@example.com>"
    msg["References"] = "<root@example.com> <prev@example.com>"
    msg.set_content("Grüße aus Köln, bitte löschen.\n", charset="iso-8859-1", cte="8bit")
    msg.add_alternative("<p>Grüße aus <b>Köln</b></p>\n", subtype="html")
    msg.add_attachment(b"%PDF-1.4 fake\n" * 10, maintype="application", subtype="pdf",
                       filename="rechnung.pdf")
    msg.add_attachment(b"x" * 5000, maintype="application", subtype="octet-stream",
                       filename="big.bin")
    return msg.as_bytes()


def _fetched(tmp_path: Path, raw: bytes, uidl: str = "UID-1") -> FetchedMessage:
    path = tmp_path / f"{uidl}.eml"
    path.write_bytes(raw)
    return FetchedMessage(
        account="helpdesk", uidl=uidl, size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(), path=path,
    )


def _sink(url: str, **kwargs: Any) -> WebhookSink:
    kwargs.setdefault("backoff_initial", 0.01)
    kwargs.setdefault("timeout", 5.0)
    return WebhookSink(url, secret=SECRET, **kwargs)


async def test_delivers_signed_payload_of_a_realistic_message(
    receiver: Receiver, tmp_path: Path
) -> None:
    raw = _realistic_message()
    message = _fetched(tmp_path, raw)
    sink = _sink(receiver.url, include_raw=True)
    try:
        await sink.deliver(message)
    finally:
        await sink.close()

    [request] = receiver.requests
    assert request.signature_ok
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == message.idempotency_key
    payload = request.json()
    assert payload["account"] == "helpdesk"
    assert payload["uidl"] == "UID-1"
    assert payload["idempotency_key"] == message.idempotency_key
    assert payload["sha256"] == message.sha256
    assert payload["size"] == len(raw)
    assert payload["from"] == [{"name": "Zoë Müller", "address": "zoe@example.org"}]
    assert payload["to"] == [
        {"name": "Support", "address": "support@example.com"},
        {"name": "", "address": "ops@example.com"},
    ]
    assert payload["cc"] == [{"name": "Jürgen", "address": "juergen@example.net"}]
    assert payload["subject"] == "Fehler beim Löschen✓"
    assert payload["date_iso"] == "2026-11-24T10:15:00+01:00"
    assert payload["message_id"] == "<abc123@example.org>"
    assert payload["in_reply_to"] == "<prev@example.com>"
    assert payload["references"] == ["<root@example.com>", "<prev@example.com>"]
    assert payload["text"] == "Grüße aus Köln, bitte löschen.\n"
    assert payload["html"] == "<p>Grüße aus <b>Köln</b></p>\n"
    names = [(a["filename"], a["content_type"], a["size"]) for a in payload["attachments"]]
    assert names == [
        ("rechnung.pdf", "application/pdf", 140),
        ("big.bin", "application/octet-stream", 5000),
    ]
    assert base64.b64decode(payload["attachments"][0]["content"]) == b"%PDF-1.4 fake\n" * 10
    assert base64.b64decode(payload["raw"]) == raw


async def test_latin1_body_labelled_wrongly_still_decodes(
    receiver: Receiver, tmp_path: Path
) -> None:
    raw = (
        b"From: a@example.org\r\nSubject: plain\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=x-unknown-charset\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nK\xf6ln \xfcber alles\r\n"
    )
    sink = _sink(receiver.url)
    try:
        await sink.deliver(_fetched(tmp_path, raw))
    finally:
        await sink.close()
    payload = receiver.requests[0].json()
    # Unknown label, not UTF-8: the text survives with replacement characters.
    assert payload["text"] == "K\ufffdln \ufffdber alles\r\n"
    assert payload["html"] is None
    assert payload["attachments"] == []


async def test_attachment_caps_omit_content_and_say_so(
    receiver: Receiver, tmp_path: Path
) -> None:
    sink = _sink(receiver.url, attachment_max_bytes=1000, attachments_total_max_bytes=100)
    try:
        await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    pdf, big = receiver.requests[0].json()["attachments"]
    # The 140-byte PDF fits the per-item cap but not the 100-byte total budget.
    assert pdf["content"] is None
    assert pdf["content_omitted"] is True
    assert big["content"] is None
    assert big["content_omitted"] is True
    assert big["size"] == 5000

    receiver.requests.clear()
    sink = _sink(receiver.url, attachment_max_bytes=1000, attachments_total_max_bytes=10_000)
    try:
        await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    pdf, big = receiver.requests[0].json()["attachments"]
    assert pdf["content_omitted"] is False
    assert pdf["content"]
    assert big["content_omitted"] is True
    assert big["content"] is None


async def test_malformed_message_still_produces_a_payload(
    receiver: Receiver, tmp_path: Path
) -> None:
    raw = (
        b"From: <<<broken@@\r\nTo: undisclosed-recipients:;\r\n"
        b"Subject: =?utf-8?b?not base64!!?=\r\nDate: yesterday-ish\r\n"
        b"Content-Type: multipart/mixed; boundary=\"never-closed\"\r\n\r\n"
        b"--never-closed\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n@@@not-base64@@@\r\n"
    )
    sink = _sink(receiver.url)
    try:
        await sink.deliver(_fetched(tmp_path, raw))
    finally:
        await sink.close()
    payload = receiver.requests[0].json()
    assert payload["uidl"] == "UID-1"
    assert payload["date_iso"] is None
    assert payload["defects"]  # the receiver learns the message was damaged


async def test_client_error_is_permanent_with_status_and_bounded_excerpt(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script = [Reply(400, b"invalid ticket: " + b"z" * 5000)]
    sink = _sink(receiver.url)
    try:
        with pytest.raises(PermanentSinkError, match="HTTP 400: invalid ticket") as info:
            await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    assert len(receiver.requests) == 1  # a 400 is never retried
    assert len(str(info.value)) < 1000


async def test_429_with_retry_after_then_200_is_delivered(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script = [Reply(429, headers={"Retry-After": "0"}), Reply(200)]
    sink = _sink(receiver.url)
    try:
        await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    first, second = receiver.requests
    assert first.signature_ok
    assert second.signature_ok
    assert first.body == second.body
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]


async def test_retry_after_beyond_cap_gives_the_message_back_at_once(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script = [Reply(503, headers={"Retry-After": "3600"})]
    sink = _sink(receiver.url, retry_after_max=5.0)
    try:
        with pytest.raises(TemporarySinkError, match="3600s"):
            await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    assert len(receiver.requests) == 1


async def test_repeated_500_is_temporary_after_bounded_attempts(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script = [Reply(500, b"database down")]
    sink = _sink(receiver.url, max_attempts=3)
    try:
        with pytest.raises(TemporarySinkError, match="3 attempts: HTTP 500: database down"):
            await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    assert len(receiver.requests) == 3


async def test_retries_stop_within_the_total_budget_with_the_real_reason(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script = [Reply(503, b"maintenance")]
    sink = _sink(receiver.url, max_attempts=50, backoff_initial=0.2, total_timeout=0.5)
    try:
        with pytest.raises(TemporarySinkError, match="HTTP 503: maintenance"):
            await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    assert 1 <= len(receiver.requests) < 50


async def test_slow_receiver_times_out_as_temporary(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.script = [Reply(200, delay=3.0)]
    sink = _sink(receiver.url, timeout=0.3, max_attempts=2)
    try:
        with pytest.raises(TemporarySinkError, match="timed out"):
            await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    assert len(receiver.requests) == 2


async def test_connection_refused_is_temporary(tmp_path: Path) -> None:
    port = free_port()  # a port nobody listens on
    sink = _sink(f"http://127.0.0.1:{port}/hook", max_attempts=2)
    try:
        with pytest.raises(TemporarySinkError, match="connection failed"):
            await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()


async def test_tls_is_verified_and_a_private_ca_can_be_trusted(
    tls_files: Any, tmp_path: Path
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    for server in serve(Receiver(), context):
        untrusting = _sink(server.url, max_attempts=1)
        try:
            with pytest.raises(TemporarySinkError, match="connection failed"):
                await untrusting.deliver(_fetched(tmp_path, _realistic_message()))
        finally:
            await untrusting.close()
        trusting = _sink(server.url, ca_file=tls_files.ca)
        try:
            await trusting.deliver(_fetched(tmp_path, _realistic_message()))
        finally:
            await trusting.close()
        assert [r.signature_ok for r in server.requests] == [True]


async def test_secret_never_reaches_the_log(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script = [Reply(500), Reply(200)]
    caplog.set_level(logging.DEBUG)
    sink = _sink(receiver.url)
    try:
        await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    assert "retrying" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in repr(sink)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="secret"):
        WebhookSink("http://127.0.0.1:1/", secret="")


async def test_built_from_settings_without_secret_sends_unsigned(
    receiver: Receiver, tmp_path: Path
) -> None:
    from popbox.collector.config import WebhookSinkSettings
    from popbox.collector.sinks import SinkContext, build_sink

    settings = WebhookSinkSettings(
        kind="webhook", url=receiver.url, headers={"Authorization": "Token t0k"}, retries=0
    )
    sink = build_sink(settings, cast(SinkContext, None))
    assert sink.name == f"webhook:{receiver.url}"
    try:
        await sink.deliver(_fetched(tmp_path, _realistic_message()))
    finally:
        await sink.close()
    [request] = receiver.requests
    assert request.headers["Authorization"] == "Token t0k"
    assert "X-Popbox-Signature" not in request.headers
    assert request.json()["uidl"] == "UID-1"


def _payload_of(raw: bytes, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    return build_payload(_fetched(tmp_path, raw), raw, **kwargs)


def test_forwarded_message_and_second_text_part_are_kept(tmp_path: Path) -> None:
    inner = EmailMessage()
    inner["Subject"] = "the original"
    inner.set_content("original body\n")
    outer = EmailMessage()
    outer["Subject"] = "Fwd: the original"
    outer.set_content("see below\n")
    outer.add_attachment("a second note\n", disposition="inline")
    outer.add_attachment(inner)
    payload = _payload_of(outer.as_bytes(), tmp_path)
    assert payload["text"] == "see below\n"
    note, forwarded = payload["attachments"]
    assert note["content_type"] == "text/plain"
    assert base64.b64decode(note["content"]) == b"a second note\n"
    assert forwarded["content_type"] == "message/rfc822"
    assert b"Subject: the original" in base64.b64decode(forwarded["content"])


def test_hostile_nesting_is_bounded(tmp_path: Path) -> None:
    depth = 200
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    raw = b"Subject: deep\r\n" + opening + b"Content-Type: text/plain\r\n\r\nbottom\r\n"
    payload = _payload_of(raw, tmp_path)
    assert payload["subject"] == "deep"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000) | st.builds(
    lambda head, body: head + b"\r\n\r\n" + body,
    st.lists(st.sampled_from([
        b"Subject: =?utf-8?q?=ZZ?=", b"From: <<@@>>", b"Date: 99 Foo 99999",
        b"Content-Type: multipart/alternative; boundary=x",
        b"Content-Type: text/plain; charset=\"\xff\"", b"Content-Transfer-Encoding: base64",
        b"To: a@b, (comment, \"q\" <c@d>", b"Content-Disposition: attachment; filename*=x''%ff",
    ])).map(b"\r\n".join),
    st.binary(max_size=500),
))
def test_any_bytes_give_a_json_payload(tmp_path: Path, raw: bytes) -> None:
    body = encode_payload(_payload_of(raw, tmp_path, include_raw=True))
    payload = json.loads(body.decode("utf-8"))  # strict: the body is valid UTF-8
    assert payload["uidl"] == "UID-1"
    assert base64.b64decode(payload["raw"]) == raw


def test_raw_8bit_headers_become_valid_utf8(tmp_path: Path) -> None:
    raw = (
        "From: Jürgen <j@example.org>\r\nTo: Zoë <z@example.org>\r\n".encode()
        + b"Cc: Fran\xe7ois <f@example.org>\r\nSubject: K\xf6ln\r\n\r\nbody\r\n"
    )
    payload = json.loads(encode_payload(_payload_of(raw, tmp_path)).decode("utf-8"))
    assert payload["from"] == [{"name": "Jürgen", "address": "j@example.org"}]
    assert payload["to"] == [{"name": "Zoë", "address": "z@example.org"}]
    assert payload["cc"] == [{"name": "Fran\ufffdois", "address": "f@example.org"}]
    assert payload["subject"] == "K\ufffdln"
