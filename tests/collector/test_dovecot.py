"""The collector against a real Dovecot on loopback, with TLS verification."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Any

import pytest

from support.dovecot import DovecotServer
from support.fetch import MakeSettings, maildir_messages, message, poll

pytestmark = pytest.mark.interop


async def test_fetches_every_message_once_over_verified_tls(
    dovecot: DovecotServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    for index in range(12):
        dovecot.add_message("alice", message(index))
    settings = make_settings(dovecot)
    result = await poll(settings)
    assert result.ok, result.error
    assert result.delivered == 12
    expected = sorted(message(index) for index in range(12))
    assert maildir_messages(tmp_path / "out") == expected
    # A second run finds nothing new; the server keeps the mail (default policy).
    again = await poll(settings)
    assert again.ok
    assert (again.delivered, again.pending) == (0, 0)
    assert len(maildir_messages(tmp_path / "out")) == 12
    assert len(dovecot.stored_messages("alice")) == 12


async def test_delete_after_delivery_empties_the_server(
    dovecot: DovecotServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    for index in range(5):
        dovecot.add_message("alice", message(index))
    result = await poll(make_settings(dovecot, delete="after_delivery"))
    assert result.ok, result.error
    assert (result.delivered, result.deleted) == (5, 5)
    assert dovecot.stored_messages("alice") == []


async def test_starttls_on_the_plain_port(
    dovecot: DovecotServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    dovecot.add_message("alice", message(1))
    settings = make_settings(dovecot, security="starttls", port=dovecot.pop3_port)
    result = await poll(settings)
    assert result.ok, result.error
    assert maildir_messages(tmp_path / "out") == [message(1)]


@pytest.mark.parametrize("mechanism", ["user", "plain", "login"])
async def test_password_mechanisms(
    dovecot: DovecotServer, make_settings: MakeSettings, mechanism: str
) -> None:
    dovecot.add_message("alice", message(1))
    result = await poll(make_settings(dovecot, auth_mechanism=mechanism))
    assert result.ok, result.error
    assert result.delivered == 1


async def test_wrong_password_fails_the_account(
    dovecot: DovecotServer, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(dovecot)
    monkeypatch.setenv("POPBOX_TEST_PASSWORD", "wrong")
    result = await poll(settings)
    assert not result.ok
    assert result.error_code == "AUTH"


async def test_untrusted_certificate_is_refused(
    dovecot: DovecotServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    dovecot.add_message("alice", message(1))
    # No ca_file: the system store does not know the test CA.
    result = await poll(make_settings(dovecot, ca_file=None))
    assert not result.ok
    assert "certificate" in (result.error or "").lower()
    assert not (tmp_path / "out").exists()


async def test_certificate_name_mismatch_is_refused(
    dovecot: DovecotServer, make_settings: MakeSettings
) -> None:
    result = await poll(make_settings(dovecot, tls_server_name="mail.example.org"))
    assert not result.ok


async def test_fingerprint_pinning(
    dovecot: DovecotServer, make_settings: MakeSettings, tls_files: Any
) -> None:
    pem = tls_files.cert.read_text()
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    der = ssl.PEM_cert_to_DER_cert(pem[start:end])
    good = hashlib.sha256(der).hexdigest()
    dovecot.add_message("alice", message(1))
    ok = await poll(make_settings(dovecot, ca_file=None, tls_fingerprint=good))
    assert ok.ok, ok.error
    bad = await poll(make_settings(dovecot, ca_file=None, tls_fingerprint="00" * 32))
    assert not bad.ok
    assert "fingerprint" in (bad.error or "")


async def test_mbox_sink_quotes_from_lines(
    dovecot: DovecotServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    dovecot.add_message("alice", message(1, b"From here on\n>From there\n"))
    dovecot.add_message("alice", message(2))
    mbox = tmp_path / "box.mbox"
    result = await poll(make_settings(dovecot, sinks=[{"kind": "mbox", "path": str(mbox)}]))
    assert result.ok, result.error
    text = mbox.read_bytes()
    # Each entry's From line names the message's From address (POP3 gives no sender).
    assert text.startswith(b"From sender1@example.com ")
    assert text.count(b"\nFrom sender2@example.com ") == 1
    assert b"\n>From here on\n>>From there\n" in text


async def test_poison_message_does_not_block_later_ones(
    dovecot: DovecotServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    for index in range(4):
        dovecot.add_message("alice", message(index))
    # The command refuses message 1 for good (exit 1) and takes the others.
    script = tmp_path / "sink.sh"
    script.write_text(
        "#!/bin/sh\nbody=$(cat)\ncase \"$body\" in *'message 1'*) echo no >&2; exit 1;; esac\n"
        'echo "$POPBOX_IDEMPOTENCY_KEY" >> ' + str(tmp_path / "taken") + "\n"
    )
    script.chmod(0o755)
    settings = make_settings(dovecot, sinks=[{"kind": "command", "command": str(script)}])
    result = await poll(settings)
    assert result.ok, result.error
    assert (result.delivered, result.quarantined) == (3, 1)
    quarantined = list((settings.quarantine_path / "alice").glob("*.eml"))
    assert len(quarantined) == 1
    assert b"message 1" in quarantined[0].read_bytes()
    reason = quarantined[0].with_name(quarantined[0].name[:-4] + ".reason").read_text()
    assert "exit 1" in reason
    # Next run: nothing is retried without --retry-quarantined.
    assert (await poll(settings)).delivered == 0
    assert len((tmp_path / "taken").read_text().split()) == 3


async def test_big_message_with_dot_lines_arrives_byte_exact(
    dovecot: DovecotServer, make_settings: MakeSettings, tmp_path: Path
) -> None:
    # 4 MiB with a dot-leading line every few lines: stuffing across every chunk edge.
    lines = [b".%06d dotted line of a big attachment" % i for i in range(0, 100_000)]
    big = message(1, b"\n".join(lines) + b"\n")
    dovecot.add_message("alice", big)
    dovecot.add_message("alice", message(2))
    result = await poll(make_settings(dovecot, max_in_flight=2))
    assert result.ok, result.error
    assert maildir_messages(tmp_path / "out") == sorted([big, message(2)])
