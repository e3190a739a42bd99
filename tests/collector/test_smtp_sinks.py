"""LmtpSink and SmtpSink against real aiosmtpd servers on 127.0.0.1 and a unix socket."""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from popbox.collector.base import FetchedMessage
from popbox.collector.sinks.smtp import LmtpSink, SmtpSink
from popbox.errors import PermanentSinkError, TemporarySinkError
from support.ports import free_port

MESSAGE = (
    b"From: Sender <sender@example.org>\r\nTo: desk@example.com\r\n"
    b"Subject: h\xc3\xa9llo\r\nMessage-ID: <m1@example.org>\r\n\r\n"
    b"line one\r\n.a line that starts with a dot\r\n..two dots\r\nlast line\r\n"
)


@dataclass
class Delivery:
    sender: str
    recipients: list[str]
    content: bytes


@dataclass
class Handler:
    """Answers RCPT and DATA from a script, records what was accepted."""

    rcpt: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    """LMTP: per recipient; SMTP: under the key "*"."""
    lmtp: bool = True
    deliveries: list[Delivery] = field(default_factory=list)
    data_delay: float = 0.0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        reply = self.rcpt.get(address, "250 OK")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.lmtp:
            replies = [self.data.get(r, "250 2.0.0 delivered") for r in envelope.rcpt_tos]
            got = [r for r, reply in zip(envelope.rcpt_tos, replies, strict=True)
                   if reply.startswith("250")]
        else:
            replies = [self.data.get("*", "250 2.0.0 queued")]
            got = list(envelope.rcpt_tos) if replies[0].startswith("250") else []
        if got:
            self.deliveries.append(
                Delivery(envelope.mail_from, got, envelope.original_content)
            )
        return "\r\n".join(replies)


@dataclass
class Server:
    handler: Handler
    port: int


def _fetched(tmp_path: Path) -> FetchedMessage:
    path = tmp_path / "m.eml"
    path.write_bytes(MESSAGE)
    return FetchedMessage("acct", "U1", len(MESSAGE), hashlib.sha256(MESSAGE).hexdigest(), path)


async def _start(factory: Any) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def lmtp_server() -> AsyncIterator[Server]:
    handler = Handler(lmtp=True)
    server, port = await _start(lambda: LMTP(handler, hostname="mda.test"))
    try:
        yield Server(handler, port)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def smtp_server() -> AsyncIterator[Server]:
    handler = Handler(lmtp=False)
    server, port = await _start(lambda: SMTP(handler, hostname="mta.test"))
    try:
        yield Server(handler, port)
    finally:
        server.close()
        await server.wait_closed()


def _lmtp(port: int, *recipients: str, **kwargs: Any) -> LmtpSink:
    return LmtpSink(recipients=list(recipients), host="127.0.0.1", port=port,
                    timeout=10.0, local_hostname="collector.test", **kwargs)


def _smtp(port: int, *recipients: str, **kwargs: Any) -> SmtpSink:
    return SmtpSink(recipients=list(recipients), host="127.0.0.1", port=port,
                    timeout=10.0, local_hostname="collector.test", **kwargs)


# ---------------------------------------------------------------------------- LMTP


async def test_lmtp_delivers_bytes_unchanged_to_every_recipient(
    lmtp_server: Server, tmp_path: Path
) -> None:
    sink = _lmtp(lmtp_server.port, "a@x.test", "b@x.test", sender="bounce@x.test")
    await sink.deliver(_fetched(tmp_path))
    [delivery] = lmtp_server.handler.deliveries
    assert delivery.sender == "bounce@x.test"
    assert delivery.recipients == ["a@x.test", "b@x.test"]
    assert delivery.content == MESSAGE


async def test_lmtp_one_recipient_temporary_retries_only_that_recipient(
    lmtp_server: Server, tmp_path: Path
) -> None:
    lmtp_server.handler.data = {"b@x.test": "452 4.2.2 mailbox full"}
    sink = _lmtp(lmtp_server.port, "a@x.test", "b@x.test")
    with pytest.raises(TemporarySinkError, match=re.escape("<b@x.test> 452 4.2.2 mailbox full")):
        await sink.deliver(_fetched(tmp_path))
    lmtp_server.handler.data = {}
    await sink.deliver(_fetched(tmp_path))
    # a@x.test got the message exactly once, b@x.test on the retry.
    assert [d.recipients for d in lmtp_server.handler.deliveries] == [
        ["a@x.test"], ["b@x.test"],
    ]


async def test_lmtp_reply_after_the_engine_gave_up_still_counts(
    lmtp_server: Server, tmp_path: Path
) -> None:
    lmtp_server.handler.data_delay = 1.0
    lmtp_server.handler.data = {"b@x.test": "451 4.3.0 try again"}
    sink = _lmtp(lmtp_server.port, "a@x.test", "b@x.test")
    message = _fetched(tmp_path)
    with pytest.raises(TimeoutError):  # what the poll engine's wait_for does
        await asyncio.wait_for(sink.deliver(message), 0.2)
    for _ in range(100):  # the worker thread finishes on its own; wait for it (bounded)
        if sink._partial:
            break
        await asyncio.sleep(0.05)
    lmtp_server.handler.data_delay = 0.0
    lmtp_server.handler.data = {}
    await sink.deliver(message)
    assert [d.recipients for d in lmtp_server.handler.deliveries] == [
        ["a@x.test"], ["b@x.test"],
    ]


async def test_lmtp_all_recipients_5xx_is_permanent(
    lmtp_server: Server, tmp_path: Path
) -> None:
    lmtp_server.handler.data = {"a@x.test": "552 5.2.2 over quota",
                                "b@x.test": "554 5.6.0 rejected"}
    sink = _lmtp(lmtp_server.port, "a@x.test", "b@x.test")
    with pytest.raises(PermanentSinkError, match=re.escape("552 5.2.2 over quota")):
        await sink.deliver(_fetched(tmp_path))
    assert lmtp_server.handler.deliveries == []


async def test_lmtp_rcpt_refusal_resets_before_data(
    lmtp_server: Server, tmp_path: Path
) -> None:
    lmtp_server.handler.rcpt = {"b@x.test": "450 4.2.1 try later"}
    sink = _lmtp(lmtp_server.port, "a@x.test", "b@x.test")
    with pytest.raises(TemporarySinkError, match=re.escape("450 4.2.1")):
        await sink.deliver(_fetched(tmp_path))
    lmtp_server.handler.rcpt = {"b@x.test": "550 5.1.1 no such user"}
    with pytest.raises(PermanentSinkError, match=re.escape("550 5.1.1")):
        await sink.deliver(_fetched(tmp_path))
    assert lmtp_server.handler.deliveries == []  # DATA never happened


async def test_lmtp_over_a_unix_socket(tmp_path: Path) -> None:
    handler = Handler(lmtp=True)
    path = tmp_path / "lmtp.sock"
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: LMTP(handler, hostname="mda.test"), str(path)
    )
    try:
        sink = LmtpSink(recipients=["u@x.test"], socket_path=path, timeout=10.0)
        await sink.deliver(_fetched(tmp_path))
    finally:
        server.close()
        await server.wait_closed()
    assert [d.content for d in handler.deliveries] == [MESSAGE]


async def test_unreachable_servers_are_temporary(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(TemporarySinkError):
        await _lmtp(port, "a@x.test").deliver(_fetched(tmp_path))
    with pytest.raises(TemporarySinkError):
        await _smtp(port, "a@x.test").deliver(_fetched(tmp_path))


# ---------------------------------------------------------------------------- SMTP


async def test_smtp_delivers_with_null_sender(smtp_server: Server, tmp_path: Path) -> None:
    sink = _smtp(smtp_server.port, "a@x.test", "b@x.test")
    await sink.deliver(_fetched(tmp_path))
    [delivery] = smtp_server.handler.deliveries
    assert delivery.sender == "<>"  # aiosmtpd records the null reverse-path so
    assert delivery.recipients == ["a@x.test", "b@x.test"]
    assert delivery.content == MESSAGE


@pytest.mark.parametrize(
    ("reply", "error"),
    [("451 4.3.0 queue busy", TemporarySinkError), ("554 5.7.1 spam", PermanentSinkError)],
)
async def test_smtp_data_reply_decides(
    smtp_server: Server, tmp_path: Path, reply: str, error: type[Exception]
) -> None:
    smtp_server.handler.data = {"*": reply}
    with pytest.raises(error, match=reply):
        await _smtp(smtp_server.port, "a@x.test").deliver(_fetched(tmp_path))


async def test_smtp_is_all_or_nothing_across_recipients(
    smtp_server: Server, tmp_path: Path
) -> None:
    smtp_server.handler.rcpt = {"b@x.test": "550 5.1.1 unknown"}
    with pytest.raises(PermanentSinkError, match=re.escape("<b@x.test> 550 5.1.1 unknown")):
        await _smtp(smtp_server.port, "a@x.test", "b@x.test").deliver(_fetched(tmp_path))
    smtp_server.handler.rcpt = {"b@x.test": "451 4.4.0 later"}
    with pytest.raises(TemporarySinkError, match=re.escape("451 4.4.0")):
        await _smtp(smtp_server.port, "a@x.test", "b@x.test").deliver(_fetched(tmp_path))
    assert smtp_server.handler.deliveries == []


async def test_smtp_starttls_verifies_the_server(tls_files: Any, tmp_path: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    handler = Handler(lmtp=False)
    server, port = await _start(
        lambda: SMTP(handler, hostname="mta.test", tls_context=context, require_starttls=True)
    )
    try:
        untrusting = SmtpSink(recipients=["a@x.test"], host="localhost", port=port,
                              security="starttls", timeout=10.0)
        with pytest.raises(TemporarySinkError):
            await untrusting.deliver(_fetched(tmp_path))
        trusting = SmtpSink(recipients=["a@x.test"], host="localhost", port=port,
                            security="starttls", ca_file=tls_files.ca, timeout=10.0)
        await trusting.deliver(_fetched(tmp_path))
    finally:
        server.close()
        await server.wait_closed()
    assert [d.content for d in handler.deliveries] == [MESSAGE]


# ---------------------------------------------------------------------------- popbox


async def test_lmtp_into_popbox_own_lmtp_service_with_a_full_mailbox(tmp_path: Path) -> None:
    """The real thing on the other end: popbox's LMTP listener, quota and store."""
    from popbox.auth.memory import MemoryPassDB
    from popbox.config import Config, LmtpSettings, QuotaSettings
    from popbox.delivery.deliverer import Deliverer
    from popbox.delivery.lmtp import LmtpService
    from popbox.store.memory import MemoryStore

    store = MemoryStore()
    config = Config(
        data_dir=tmp_path,
        lmtp=LmtpSettings(listen=["127.0.0.1:0"]),
        quota=QuotaSettings(messages=1),
    )
    passdb = MemoryPassDB({"alice": "x", "bob": "x"})
    service = LmtpService(config, Deliverer(config, store, passdb))
    await service.start()
    try:
        await store.deliver("bob", b"Subject: already here\r\n\r\nold\r\n")  # bob is full
        [(_, port)] = service.addresses
        sink = _lmtp(port, "alice@example.org", "bob@example.org")
        message = _fetched(tmp_path)
        with pytest.raises(TemporarySinkError, match=re.escape("<bob@example.org> 452")):
            await sink.deliver(message)
        # bob reads his mail and deletes it; the collector's retry reaches only him.
        maildrop = await store.open_maildrop("bob")
        await maildrop.commit_deletions([0])
        await sink.deliver(message)

        with pytest.raises(PermanentSinkError, match="550"):
            await _lmtp(port, "nobody@example.org").deliver(message)
    finally:
        await service.stop()
    assert (await store.usage("alice")).messages == 1
    assert (await store.usage("bob")).messages == 1
