"""The IMAP sink against a real Dovecot: what lands in the folder, byte for byte.

Dovecot's user bob is the destination (IMAP with STARTTLS, or implicit TLS, with the
test CA's certificate); what the sink appended is read back from bob's Maildir files
(Dovecot stores IMAP appends with CRLF as sent) and over IMAP (INTERNALDATE, FLAGS).
OAuth2 logins go through Dovecot's oauth2 passdb, which asks the fake authorization
server about every token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from imapclient import IMAPClient

from popbox.collector.base import FetchedMessage
from popbox.collector.config import FetchSettings
from popbox.collector.oauth import TokenFile
from popbox.collector.sinks import SinkContext, build_sink
from popbox.collector.sinks.imap import ImapSink
from popbox.collector.sinks.message_head import popbox_id
from popbox.errors import (
    ConfigError,
    PermanentSinkError,
    SinkError,
    SinkUnavailable,
    TemporarySinkError,
)
from support.dovecot import DovecotServer, imap_skip_reason, start_dovecot
from support.fetch import account_entry, fetch_settings, message, run_fetch, write_fetch_config
from support.oauth import CLIENT_ID, FakeAuthServer

pytestmark = pytest.mark.interop

BOB_PASSWORD = "bob-s3cret"
BOB_PASSWORD_ENV = "POPBOX_TEST_IMAP_PASSWORD"


def _oauth2_passdb(root: Path, introspection_url: str) -> str:
    ext = root / "dovecot-oauth2.conf.ext"
    root.mkdir(parents=True, exist_ok=True)
    ext.write_text(
        f"introspection_mode = post\nintrospection_url = {introspection_url}\n"
        "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
        "force_introspection = yes\n"
    )
    return (
        "auth_mechanisms = plain login xoauth2 oauthbearer\n"
        f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {ext}\n}}\n"
    )


def _start(root: Path, tls_files: Any, extra: str = "") -> DovecotServer:
    reason = imap_skip_reason()
    if reason:
        pytest.skip(reason)
    server = start_dovecot(root, tls_files.cert, tls_files.key, extra_config=extra)
    server.add_user("alice", "secret")
    server.add_user("bob", BOB_PASSWORD)
    return server


@pytest.fixture
def imap_dovecot(tls_files: Any, shared_tmp: Path) -> Iterator[DovecotServer]:
    """A private Dovecot serving POP3 (alice) and IMAP (bob, the destination)."""
    server = _start(shared_tmp / "dovecot", tls_files)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oauth_imap_dovecot(
    tls_files: Any, shared_tmp: Path, auth_server: FakeAuthServer
) -> Iterator[DovecotServer]:
    """The same, checking bearer tokens with ``auth_server``."""
    root = shared_tmp / "dovecot"
    server = _start(root, tls_files, _oauth2_passdb(root, f"{auth_server.url}/introspect"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _bob_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOB_PASSWORD_ENV, BOB_PASSWORD)


def imap_sink_entry(server: DovecotServer, tls_files: Any, **fields: Any) -> dict[str, Any]:
    """An IMAP sink into bob's INBOX over implicit TLS; ``fields`` add or replace keys."""
    entry: dict[str, Any] = {
        "kind": "imap",
        "host": "127.0.0.1",
        "port": server.imaps_port,
        "security": "tls",
        "ca_file": str(tls_files.ca),
        "tls_server_name": "localhost",
        "username": "bob",
        "password_env": BOB_PASSWORD_ENV,
    }
    entry.update(fields)
    return entry


def _settings(tmp_path: Path, server: DovecotServer, sink: dict[str, Any]) -> FetchSettings:
    return fetch_settings(tmp_path, account_entry(server.pop3s_port, tmp_path, sinks=[sink]))


def make_sink(tmp_path: Path, server: DovecotServer, sink: dict[str, Any]) -> ImapSink:
    settings = _settings(tmp_path, server, sink)
    [account] = settings.accounts
    built = build_sink(account.sinks[0], SinkContext(account, settings))
    assert isinstance(built, ImapSink)
    return built


async def refusal(tmp_path: Path, server: DovecotServer, sink: dict[str, Any]) -> SinkError:
    """What a sink built from ``sink`` raises for one message (it must raise)."""
    built = make_sink(tmp_path, server, sink)
    try:
        with pytest.raises(SinkError) as raised:
            await built.deliver(fetched(tmp_path, message(1), "u1"))
    finally:
        await built.close()
    return raised.value


def fetched(tmp_path: Path, data: bytes, uidl: str, attempt: int = 1) -> FetchedMessage:
    """A message as the poll engine hands it over (CRLF line ends, spooled)."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    path = tmp_path / f"spool-{uidl}"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    return FetchedMessage("alice", uidl, len(data), digest, path, attempt=attempt)


def with_id(message: FetchedMessage) -> bytes:
    """What header mode stores: the message with one X-Popbox-Id line on top."""
    return f"X-Popbox-Id: {popbox_id(message)}\r\n".encode() + message.read_bytes()


def bob_client(server: DovecotServer, tls_files: Any) -> IMAPClient:
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    client = IMAPClient("localhost", port=server.imaps_port, ssl_context=context)
    client.normalise_times = False
    client.login("bob", BOB_PASSWORD)
    return client


DATED = (
    b"Date: Tue, 01 Dec 2026 10:11:12 +0100\nFrom: a@example.com\n"
    b"Message-ID: <dated@example.com>\nSubject: dated\n\nhello\n"
)


async def test_append_sets_flags_and_internal_date_from_the_date_header(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    entry = imap_sink_entry(
        imap_dovecot, tls_files, identify="message_id", flags=["\\Seen", "\\Flagged"]
    )
    sink = make_sink(tmp_path, imap_dovecot, entry)
    dated = fetched(tmp_path, DATED, "u1")
    undated = fetched(tmp_path, message(2), "u2")
    try:
        await sink.deliver(dated)
        await sink.deliver(undated)
    finally:
        await sink.close()
    # message_id mode: the bytes are the message's own.
    assert imap_dovecot.folder_messages("bob") == sorted([dated.read_bytes(), undated.read_bytes()])
    with bob_client(imap_dovecot, tls_files) as client:
        client.select_folder("INBOX", readonly=True)
        answers = client.fetch(
            "1:*", ["INTERNALDATE", "FLAGS", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]
        )
    by_subject = {data[b"BODY[HEADER.FIELDS (SUBJECT)]"].strip(): data for data in answers.values()}
    first = by_subject[b"Subject: dated"]
    assert first[b"INTERNALDATE"] == datetime(2026, 12, 1, 9, 11, 12, tzinfo=UTC)
    assert set(first[b"FLAGS"]) - {b"\\Recent"} == {b"\\Seen", b"\\Flagged"}
    # No Date header: the time of appending.
    second = by_subject[b"Subject: message 2"]
    assert abs(second[b"INTERNALDATE"] - datetime.now(UTC)) < timedelta(hours=1)


async def test_header_mode_adds_exactly_one_header_line(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    sink = make_sink(tmp_path, imap_dovecot, imap_sink_entry(imap_dovecot, tls_files))
    item = fetched(tmp_path, message(1, b"x" * 76 + b"\n"), "u1")
    try:
        await sink.deliver(item)
    finally:
        await sink.close()
    [stored] = imap_dovecot.folder_messages("bob")
    assert stored == with_id(item)
    assert stored.startswith(b"X-Popbox-Id: " + popbox_id(item).encode() + b"\r\nFrom: ")


async def test_a_missing_folder_is_created_even_by_two_sinks_at_once(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    entry = imap_sink_entry(imap_dovecot, tls_files, folder="Bridged")
    sinks = [make_sink(tmp_path / str(n), imap_dovecot, entry) for n in range(2)]
    items = [fetched(tmp_path, message(n), f"u{n}") for n in range(2)]
    try:
        # Both find the folder missing (TRYCREATE) and race to create it.
        await asyncio.gather(*(s.deliver(m) for s, m in zip(sinks, items, strict=True)))
    finally:
        for sink in sinks:
            await sink.close()
    assert imap_dovecot.folder_messages("bob", "Bridged") == sorted(with_id(m) for m in items)
    assert imap_dovecot.folder_messages("bob") == []


async def test_a_missing_folder_without_create_folder_makes_the_sink_unavailable(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    entry = imap_sink_entry(imap_dovecot, tls_files, folder="Nowhere", create_folder=False)
    error = await refusal(tmp_path, imap_dovecot, entry)
    assert isinstance(error, SinkUnavailable)  # no message's fault: none is quarantined
    assert "does not exist" in str(error)
    assert not imap_dovecot.folder_path("bob", "Nowhere").exists()


@pytest.mark.parametrize("identify", ["header", "message_id"])
async def test_a_repeated_attempt_finds_the_message_and_appends_nothing(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path, identify: str
) -> None:
    entry = imap_sink_entry(imap_dovecot, tls_files, identify=identify, folder="Lookup")
    first = make_sink(tmp_path / "a", imap_dovecot, entry)
    item = fetched(tmp_path, message(1), "u1")
    try:
        await first.deliver(item)
    finally:
        await first.close()  # killed before the collector recorded it
    # A new process (nothing remembered) offers it again as attempt 2, alongside a
    # message that is not there yet.
    again = fetched(tmp_path, message(1), "u1", attempt=2)
    other = fetched(tmp_path, message(2), "u2", attempt=2)
    second = make_sink(tmp_path / "b", imap_dovecot, entry)
    try:
        await second.deliver_batch([again, other])
    finally:
        await second.close()
    stored = imap_dovecot.folder_messages("bob", "Lookup")
    if identify == "header":
        assert stored == sorted([with_id(item), with_id(other)])
    else:
        assert stored == sorted([item.read_bytes(), other.read_bytes()])


async def test_message_id_lookup_needs_the_same_size(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    """Another message with the same Message-ID (a resent copy, a longer one) is not
    taken for ours: LARGER n-1 SMALLER n+1 is exactly n octets."""
    entry = imap_sink_entry(imap_dovecot, tls_files, identify="message_id")
    sink = make_sink(tmp_path, imap_dovecot, entry)
    shorter = fetched(tmp_path, message(1), "u1")
    longer = fetched(tmp_path, message(1, b"one more line\n"), "u2", attempt=2)
    try:
        await sink.deliver(shorter)
        await sink.deliver(longer)
    finally:
        await sink.close()
    assert imap_dovecot.folder_messages("bob") == sorted(
        [shorter.read_bytes(), longer.read_bytes()]
    )


async def test_a_batch_goes_in_one_multiappend(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = imap_sink_entry(imap_dovecot, tls_files, connections=1)
    sink = make_sink(tmp_path, imap_dovecot, entry)
    items = [fetched(tmp_path, message(n), f"u{n}") for n in range(12)]
    caplog.set_level(logging.DEBUG, logger="popbox.collector.sinks.imap")
    try:
        await sink.deliver_batch(items)
        # The same keys again (a batch the poll engine offers once more): nothing new.
        await sink.deliver_batch(items[:3])
    finally:
        await sink.close()
    assert imap_dovecot.folder_messages("bob") == sorted(with_id(m) for m in items)
    appended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("appended")]
    assert len(appended) == 1
    assert "messages=12" in appended[0]
    assert "uid=1:12" in appended[0]  # UIDPLUS: the whole batch in one APPENDUID


async def test_a_batch_spreads_over_several_connections(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    entry = imap_sink_entry(imap_dovecot, tls_files, connections=3)
    sink = make_sink(tmp_path, imap_dovecot, entry)
    items = [fetched(tmp_path, message(n), f"u{n}") for n in range(30)]
    try:
        await sink.deliver_batch(items[:15])
        await sink.deliver_batch(items[15:])  # the pool's connections again
    finally:
        await sink.close()
    assert imap_dovecot.folder_messages("bob") == sorted(with_id(m) for m in items)


async def test_a_dropped_connection_is_reopened(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    sink = make_sink(tmp_path, imap_dovecot, imap_sink_entry(imap_dovecot, tls_files))
    items = [fetched(tmp_path, message(n), f"u{n}") for n in range(3)]
    try:
        await sink.deliver(items[0])
        imap_dovecot.kick("bob")  # the pooled connection is gone (a server restart)
        await sink.deliver_batch(items[1:])
    finally:
        await sink.close()
    assert imap_dovecot.folder_messages("bob") == sorted(with_id(m) for m in items)


class ReplyHolder:
    """A TCP relay to Dovecot that can stop passing the server's answers on while it
    still passes what the client sends: an APPEND the server stores but whose answer
    never arrives (a link that died at the worst moment)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.hold = False
        self.port = 0
        self._server: asyncio.Server | None = None
        # Both ends of every relayed connection: closed on exit, so none outlives the
        # test's event loop (Server.wait_closed does not wait for its handlers here).
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ReplyHolder:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self._writers.append(client_out)
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(server_out)

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: bool
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if not (held and self.hold):
                        sink.write(data)
                        await sink.drain()
            sink.close()

        await asyncio.gather(pump(client_in, server_out, False), pump(server_in, client_out, True))


async def test_an_append_whose_answer_was_lost_is_looked_up_before_it_is_sent_again(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    """The server stored the message but its answer never came (the poll engine's
    timeout gave up): the retry, even as the same attempt, finds it and stops there."""
    items = [fetched(tmp_path, message(n), f"u{n}") for n in range(2)]
    async with ReplyHolder(imap_dovecot.imaps_port) as relay:
        entry = imap_sink_entry(imap_dovecot, tls_files, port=relay.port)
        sink = make_sink(tmp_path, imap_dovecot, entry)
        try:
            await sink.deliver(items[0])
            relay.hold = True
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sink.deliver(items[1]), 2.0)
            while len(imap_dovecot.folder_messages("bob")) < 2:  # stored all the same
                await asyncio.sleep(0.05)
            relay.hold = False
            await sink.deliver(items[1])
        finally:
            await sink.close()
    assert imap_dovecot.folder_messages("bob") == sorted(with_id(m) for m in items)


# Dovecot's quota plugin: a size limit per message and a storage limit per user.
QUOTA_CONFIG = """
mail_plugins = $mail_plugins quota
plugin {
  quota = count:User quota
  quota_vsizes = yes
  quota_max_mail_size = 64k
  quota_rule = *:storage=100k
}
"""


async def test_too_big_is_permanent_and_over_quota_temporary(
    tls_files: Any, shared_tmp: Path, tmp_path: Path
) -> None:
    server = _start(shared_tmp / "dovecot", tls_files, QUOTA_CONFIG)
    sink = make_sink(tmp_path, server, imap_sink_entry(server, tls_files))
    try:
        with pytest.raises(PermanentSinkError, match="too big"):
            await sink.deliver(fetched(tmp_path, message(0, b"x" * 70 * 1024), "big"))
        # Two messages of 60 KiB: the second is over the user's 100 KiB.
        await sink.deliver(fetched(tmp_path, message(1, b"y" * 60 * 1024), "u1"))
        with pytest.raises(TemporarySinkError, match="over quota"):
            await sink.deliver(fetched(tmp_path, message(2, b"z" * 60 * 1024), "u2"))
    finally:
        await sink.close()
        server.stop()
    assert len(server.folder_messages("bob")) == 1


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_tls_and_starttls_verify_the_server_with_the_test_ca(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path, security: str
) -> None:
    port = imap_dovecot.imaps_port if security == "tls" else imap_dovecot.imap_port
    entry = imap_sink_entry(imap_dovecot, tls_files, security=security, port=port)
    sink = make_sink(tmp_path, imap_dovecot, entry)
    item = fetched(tmp_path, message(1), "u1")
    try:
        await sink.deliver(item)
    finally:
        await sink.close()
    assert imap_dovecot.folder_messages("bob") == [with_id(item)]


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_a_certificate_from_another_ca_is_refused(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path, security: str
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    port = imap_dovecot.imaps_port if security == "tls" else imap_dovecot.imap_port
    entry = imap_sink_entry(
        imap_dovecot, tls_files, security=security, port=port, ca_file=str(other)
    )
    error = await refusal(tmp_path, imap_dovecot, entry)
    assert isinstance(error, SinkUnavailable)
    assert "certificate verify failed" in str(error)
    assert imap_dovecot.folder_messages("bob") == []


async def test_tls_server_name_is_the_name_checked(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    entry = imap_sink_entry(imap_dovecot, tls_files, tls_server_name="other.example")
    error = await refusal(tmp_path, imap_dovecot, entry)
    assert isinstance(error, SinkUnavailable)
    assert "other.example" in str(error)
    assert imap_dovecot.folder_messages("bob") == []


async def test_a_pinned_fingerprint_replaces_the_ca_and_a_wrong_one_is_refused(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    pem = tls_files.cert.read_text()
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    der = ssl.PEM_cert_to_DER_cert(pem[pem.index(begin) : pem.index(end) + len(end)] + "\n")
    pin = hashlib.sha256(der).hexdigest()
    good = imap_sink_entry(imap_dovecot, tls_files, ca_file=None, tls_fingerprint=pin)
    bad = imap_sink_entry(imap_dovecot, tls_files, ca_file=None, tls_fingerprint="0" * 64)
    item = fetched(tmp_path, message(1), "u1")
    for entry, works in ((bad, False), (good, True)):
        sink = make_sink(tmp_path, imap_dovecot, entry)
        try:
            if works:
                await sink.deliver(item)
            else:
                with pytest.raises(TemporarySinkError, match="tls_fingerprint"):
                    await sink.deliver(item)
        finally:
            await sink.close()
    assert imap_dovecot.folder_messages("bob") == [with_id(item)]


def test_a_password_over_plaintext_is_refused_by_the_config(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    entry = imap_sink_entry(imap_dovecot, tls_files, security="none", port=imap_dovecot.imap_port)
    with pytest.raises(ConfigError, match="allow_plaintext_password"):
        _settings(tmp_path, imap_dovecot, entry)


async def test_a_password_over_plaintext_when_allowed(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    entry = imap_sink_entry(
        imap_dovecot,
        tls_files,
        security="none",
        port=imap_dovecot.imap_port,
        allow_plaintext_password=True,
        auth_mechanism="plain",
    )
    sink = make_sink(tmp_path, imap_dovecot, entry)
    item = fetched(tmp_path, message(1), "u1")
    try:
        await sink.deliver(item)
    finally:
        await sink.close()
    assert imap_dovecot.folder_messages("bob") == [with_id(item)]


async def test_a_wrong_password_is_temporary_and_never_shown(
    imap_dovecot: DovecotServer,
    tls_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(BOB_PASSWORD_ENV, "wrong-Pa55word")
    sink = make_sink(tmp_path, imap_dovecot, imap_sink_entry(imap_dovecot, tls_files))
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(TemporarySinkError, match="login as bob refused") as raised:
            await sink.deliver(fetched(tmp_path, message(1), "u1"))
        # The rest of the poll fails at once, without knocking on the server again.
        with pytest.raises(TemporarySinkError, match="login as bob refused"):
            await sink.deliver(fetched(tmp_path, message(2), "u2"))
    finally:
        await sink.close()
    assert isinstance(raised.value, SinkUnavailable)  # the run stops; no message is blamed
    assert "wrong-Pa55word" not in str(raised.value)
    assert "wrong-Pa55word" not in caplog.text
    assert imap_dovecot.folder_messages("bob") == []


def _oauth_entry(
    server: DovecotServer, tls_files: Any, auth_server: FakeAuthServer, mechanism: str
) -> dict[str, Any]:
    entry = imap_sink_entry(
        server,
        tls_files,
        auth="oauth2",
        auth_mechanism=mechanism,
        password_env=None,
        oauth={
            "token_source": "refresh_token",
            "provider": "generic",
            "client_id": CLIENT_ID,
            "token_endpoint": f"{auth_server.url}/token",
        },
    )
    return entry


def _store_sink_login(
    tmp_path: Path, server: DovecotServer, entry: dict[str, Any], auth_server: FakeAuthServer
) -> None:
    """What `popbox oauth login alice --sink LABEL` leaves behind."""
    settings = _settings(tmp_path, server, entry)
    [account] = settings.accounts
    store = settings.sink_token_store(account, account.sinks[0])
    TokenFile(store).save({"refresh_token": auth_server.issue("bob")["refresh_token"]})
    auth_server.access_tokens.clear()  # only tokens the sink fetches itself count


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_oauth2_login_with_a_token_dovecot_checks(
    oauth_imap_dovecot: DovecotServer,
    tls_files: Any,
    tmp_path: Path,
    auth_server: FakeAuthServer,
    mechanism: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = _oauth_entry(oauth_imap_dovecot, tls_files, auth_server, mechanism)
    _store_sink_login(tmp_path, oauth_imap_dovecot, entry, auth_server)
    sink = make_sink(tmp_path, oauth_imap_dovecot, entry)
    item = fetched(tmp_path, message(1), "u1")
    caplog.set_level(logging.DEBUG)
    try:
        await sink.deliver(item)
    finally:
        await sink.close()
    assert oauth_imap_dovecot.folder_messages("bob") == [with_id(item)]
    checked = [form["token"] for path, form in auth_server.requests if path == "/introspect"]
    assert checked
    assert all(token in auth_server.access_tokens for token in checked)
    assert not any(token in caplog.text for token in auth_server.access_tokens)


async def test_an_expired_token_is_refreshed_once(
    oauth_imap_dovecot: DovecotServer,
    tls_files: Any,
    tmp_path: Path,
    auth_server: FakeAuthServer,
) -> None:
    entry = _oauth_entry(oauth_imap_dovecot, tls_files, auth_server, "auto")
    _store_sink_login(tmp_path, oauth_imap_dovecot, entry, auth_server)
    sink = make_sink(tmp_path, oauth_imap_dovecot, entry)
    items = [fetched(tmp_path, message(n), f"u{n}") for n in range(2)]
    try:
        await sink.deliver(items[0])
        assert auth_server.grants("refresh_token") == 1
        await sink.close()  # the next run logs in again, with the cached token
        auth_server.revoke_access_tokens()
        await sink.deliver(items[1])
    finally:
        await sink.close()
    # One refused AUTHENTICATE with the stale token, one refresh, one accepted.
    assert auth_server.grants("refresh_token") == 2
    assert oauth_imap_dovecot.folder_messages("bob") == sorted(with_id(m) for m in items)


async def test_a_revoked_login_is_a_temporary_failure(
    oauth_imap_dovecot: DovecotServer,
    tls_files: Any,
    tmp_path: Path,
    auth_server: FakeAuthServer,
) -> None:
    entry = _oauth_entry(oauth_imap_dovecot, tls_files, auth_server, "xoauth2")
    _store_sink_login(tmp_path, oauth_imap_dovecot, entry, auth_server)
    auth_server.refresh_tokens.clear()  # the user revoked popbox's access
    sink = make_sink(tmp_path, oauth_imap_dovecot, entry)
    try:
        with pytest.raises(TemporarySinkError, match="no access token"):
            await sink.deliver(fetched(tmp_path, message(1), "u1"))
    finally:
        await sink.close()


def test_popbox_fetch_bridges_pop3_into_imap(
    imap_dovecot: DovecotServer, tls_files: Any, tmp_path: Path
) -> None:
    """End to end: `popbox fetch` takes alice's mail over POP3 and APPENDs it into
    bob's folder over IMAP, deleting it from the POP3 server once delivered."""
    originals = [message(n, b"line\n" * n) for n in range(8)]
    for data in originals:
        imap_dovecot.add_message("alice", data)
    sink = imap_sink_entry(imap_dovecot, tls_files, folder="From POP", flags=["\\Seen"])
    # The subprocess reads bob's password from the environment it inherits.
    account = account_entry(
        imap_dovecot.pop3s_port,
        tmp_path / "unused",
        ca_file=str(tls_files.ca),
        tls_server_name="localhost",
        delete="after_delivery",
        sinks=[sink],
    )
    config = write_fetch_config(
        tmp_path / "popbox.toml", account, state_dir=str(tmp_path / "state")
    )
    output: list[bytes] = []
    assert run_fetch(config, None, output) == 0, output[-1].decode(errors="replace")
    stored = imap_dovecot.folder_messages("bob", "From POP")
    assert len(stored) == len(originals)
    bodies = sorted(data.split(b"\r\n", 1)[1] for data in stored)
    assert all(data.startswith(b"X-Popbox-Id: ") for data in stored)
    assert bodies == sorted(data.replace(b"\n", b"\r\n") for data in originals)
    assert imap_dovecot.stored_messages("alice") == []
