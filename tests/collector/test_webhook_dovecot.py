"""A helpdesk's view: Dovecot mailbox -> popbox fetch -> webhook, one ticket per message.

The whole path runs for real: a private Dovecot on loopback with verified TLS, the
collector's poll engine, the webhook sink built from settings, and a local HTTP
receiver that checks signatures and refuses one message for good (a poison message).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from support.dovecot import DovecotServer
from support.fetch import MakeSettings, message, poll
from support.webhook import SECRET, Received, Receiver, Reply, serve

pytestmark = pytest.mark.interop


class Helpdesk(Receiver):
    """Refuses "message 1" (400), is busy once for "message 2" (503), takes the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_once = True
        self.tickets: dict[str, dict[str, Any]] = {}

    def reply_for(self, request: Received) -> Reply:
        payload = request.json()
        if not request.signature_ok:
            return Reply(401, b"bad signature")
        if payload["subject"] == "message 1":
            return Reply(400, b'{"error": "mailbox not allowed to open tickets"}')
        if payload["subject"] == "message 2" and self.busy_once:
            self.busy_once = False
            return Reply(503, b"busy", {"Retry-After": "0"})
        key = request.headers["Idempotency-Key"]
        self.tickets.setdefault(key, payload)  # a redelivered key opens no new ticket
        return Reply(201, b'{"ticket": 1}')


@pytest.fixture
def helpdesk() -> Iterator[Helpdesk]:
    yield from serve(Helpdesk())


async def test_one_ticket_per_message_and_the_poison_one_quarantined(
    dovecot: DovecotServer, helpdesk: Helpdesk, make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POPBOX_TEST_WEBHOOK_SECRET", SECRET)
    for index in range(5):
        dovecot.add_message("alice", message(index))
    settings = make_settings(dovecot, sinks=[{
        "kind": "webhook", "url": helpdesk.url,
        "secret_env": "POPBOX_TEST_WEBHOOK_SECRET", "retries": 2,
    }])

    result = await poll(settings)
    assert result.ok, result.error
    assert (result.delivered, result.quarantined) == (4, 1)
    assert sorted(t["subject"] for t in helpdesk.tickets.values()) == [
        "message 0", "message 2", "message 3", "message 4",
    ]
    assert all(request.signature_ok for request in helpdesk.requests)
    [quarantined] = (settings.quarantine_path / "alice").glob("*.eml")
    assert b"Subject: message 1" in quarantined.read_bytes()
    reason = quarantined.with_name(quarantined.name[:-4] + ".reason").read_text()
    assert "HTTP 400" in reason
    assert "mailbox not allowed" in reason

    # The next run sends nothing: delivered ones are recorded, the poison one waits
    # in quarantine for --retry-quarantined.
    sent = len(helpdesk.requests)
    again = await poll(settings)
    assert again.ok, again.error
    assert again.delivered == 0
    assert len(helpdesk.requests) == sent
    assert len(helpdesk.tickets) == 4
