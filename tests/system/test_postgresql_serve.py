"""`popbox serve` on PostgreSQL (``storage.backend = "postgresql"``): an LMTP delivery,
then a POP3 login that lists, retrieves and deletes it, as an operator would try a
new node."""

from __future__ import annotations

from pathlib import Path

from support.serverproc import deliver_lmtp, make_server, running

MESSAGE = b"Subject: stored in PostgreSQL\r\n\r\nhello from the database\r\n"


def test_serve_delivers_and_serves_mail_from_postgresql(
    tmp_path: Path, postgres_dsn: str
) -> None:
    extra = f'[storage]\nbackend = "postgresql"\n[postgresql]\ndsn = "{postgres_dsn}"\n'
    with running(make_server(tmp_path / "node", extra=extra)) as server:
        assert deliver_lmtp(server.lmtp_port, "alice", MESSAGE) == 250
        client = server.pop3("alice")
        try:
            stored = (
                b"Return-Path: <sender@example.net>\r\nDelivered-To: alice@example.test\r\n"
                + MESSAGE
            )
            assert client.stat() == (1, len(stored))
            _, lines, _ = client.retr(1)
            assert b"\r\n".join(lines) + b"\r\n" == stored
            assert client.uidl(1).split()[2] != b""
            client.dele(1)
        finally:
            client.quit()
        client = server.pop3("alice")
        try:
            assert client.stat() == (0, 0)
        finally:
            client.quit()
    assert "Traceback" not in server.log_text()
