"""The README's path for a newcomer, through the real `popbox` command.

`popbox serve` runs as a subprocess on the embedded default layout (a config file
only moves the ports so tests never collide); users are added and mail delivered with
the CLI and over LMTP; mail is read back with curl and poplib over STLS and implicit
TLS, verifying the generated certificate.
"""

from __future__ import annotations

import base64
import os
import poplib
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from support.ports import free_port
from support.serverproc import POPBOX, wait_listening
from support.wire import crlf

MESSAGE = b"From: carol@example.org\nSubject: hello\n\nfirst line\n.starts with a dot\n\xe9 8-bit\n"


@dataclass
class Running:
    directory: Path
    config: Path
    pop3: int
    pop3s: int
    lmtp: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def cert(self) -> Path:
        return self.directory / "popbox-data" / "tls" / "cert.pem"

    def popbox(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*POPBOX, *args, "--config", str(self.config)],
            input=stdin,
            capture_output=True,
            cwd=self.directory,
            timeout=60,
            check=False,
        )

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    pop3, pop3s, lmtp = free_port(), free_port(), free_port()
    config = tmp_path / "popbox.toml"
    config.write_text(
        f"""
[pop3]
listen = ["127.0.0.1:{pop3}"]
tls_listen = ["127.0.0.1:{pop3s}"]

[limits]
auth_failure_delay = 0.1

[lmtp]
listen = ["127.0.0.1:{lmtp}"]
domains = ["example.org"]
"""
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*POPBOX, "serve", "--config", str(config)],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        for port in (pop3, pop3s, lmtp):
            wait_listening(port, process)
        yield Running(tmp_path, config, pop3, pop3s, lmtp, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _add_user(running: Running, name: str, password: str) -> None:
    result = running.popbox(
        "user", "add", name, "--password-stdin", stdin=password.encode() + b"\n"
    )
    assert result.returncode == 0, result.stderr


def test_user_deliver_and_read_with_poplib_over_stls_and_tls(running: Running) -> None:
    _add_user(running, "alice", "correct horse")
    result = running.popbox("deliver", "alice", "--from", "carol@example.org", stdin=MESSAGE)
    assert result.returncode == 0, result.stderr

    client = poplib.POP3("localhost", running.pop3, timeout=30)
    client.stls(running.client_context())
    client.user("alice")
    client.pass_("correct horse")
    count, size = client.stat()
    assert count == 1
    _, lines, octets = client.retr(1)
    body = b"\r\n".join(lines) + b"\r\n"
    assert octets == size
    assert body.endswith(crlf(MESSAGE))
    assert b"Return-Path: <carol@example.org>" in body
    uidl = client.uidl(1)
    client.quit()

    secure = poplib.POP3_SSL("localhost", running.pop3s, context=running.client_context())
    secure.user("alice")
    secure.pass_("correct horse")
    assert secure.uidl(1) == uidl
    secure.dele(1)
    secure.quit()

    again = poplib.POP3_SSL("localhost", running.pop3s, context=running.client_context())
    again.user("alice")
    again.pass_("correct horse")
    assert again.stat() == (0, 0)
    again.quit()


def test_lmtp_delivery_then_curl_over_stls_and_pop3s(running: Running) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/setup-system.sh installs it)")
    _add_user(running, "bob", "s3cret")
    with smtplib.LMTP("127.0.0.1", running.lmtp) as lmtp:
        # smtplib sends bytes as given: SMTP wants CRLF line ends on the wire.
        refused = lmtp.sendmail("carol@example.org", ["bob@example.org"], crlf(MESSAGE))
    assert refused == {}

    for url in (f"pop3://localhost:{running.pop3}/1", f"pop3s://localhost:{running.pop3s}/1"):
        args = ["curl", "-sS", "--cacert", str(running.cert), "-u", "bob:s3cret", url]
        if url.startswith("pop3://"):
            args.insert(1, "--ssl-reqd")
        fetched = subprocess.run(args, capture_output=True, timeout=60, check=False)
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.endswith(crlf(MESSAGE))
        assert b"Delivered-To: bob@example.org" in fetched.stdout


def test_wrong_password_and_unknown_user_get_the_same_answer(running: Running) -> None:
    _add_user(running, "dave", "right")
    answers = []
    for user in ("dave", "nobody"):
        client = poplib.POP3("127.0.0.1", running.pop3, timeout=30)
        client.user(user)
        with pytest.raises(poplib.error_proto) as failure:
            client.pass_("wrong")
        answers.append(failure.value.args[0])
        client.close()
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"-ERR [AUTH]")


def test_sigterm_stops_cleanly_and_does_not_commit_an_open_session(running: Running) -> None:
    _add_user(running, "erin", "pw")
    assert running.popbox("deliver", "erin", stdin=MESSAGE).returncode == 0
    client = poplib.POP3("127.0.0.1", running.pop3, timeout=30)
    client.user("erin")
    client.pass_("pw")
    client.dele(1)
    running.process.send_signal(signal.SIGTERM)
    # The session never sent QUIT: after the grace period it is dropped uncommitted.
    assert running.process.wait(60) == 0
    client.close()
    maildir = running.directory / "popbox-data" / "mail" / "erin"
    files = list((maildir / "new").iterdir()) + list((maildir / "cur").iterdir())
    assert len(files) == 1
    log = running.log.read_text()
    assert "user=erin" in log


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[pop3]\nlisten = ["nowhere"]\nplaintext_auth = "sometimes"\n[typo]\nx = 1\n')
    result = subprocess.run(
        [*POPBOX, "check-config", "--config", str(config)],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    error = result.stderr.decode()
    assert "pop3.listen" in error
    assert "pop3.plaintext_auth" in error
    assert "typo" in error


def test_embedded_default_without_a_config(tmp_path: Path) -> None:
    """`popbox serve` with no arguments: the README's first command, as is, with the
    archive keeping every delivery and its web page on 127.0.0.1:8080."""
    for port in (1110, 1995, 2424, 8080):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} of the embedded default is taken on this machine")
    env = dict(os.environ)
    env.pop("POPBOX_CONFIG", None)
    process = subprocess.Popen(
        [*POPBOX, "serve"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        for port in (1110, 1995, 2424, 8080):
            wait_listening(port, process)
        data = tmp_path / "popbox-data"
        assert (data / "passwd").stat().st_mode & 0o077 == 0
        assert (data / "tls" / "key.pem").stat().st_mode & 0o077 == 0
        added = subprocess.run(
            [*POPBOX, "user", "add", "alice", "--password-stdin"],
            input=b"pw\n",
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert added.returncode == 0, added.stderr
        context = ssl.create_default_context(cafile=str(data / "tls" / "cert.pem"))
        client = poplib.POP3_SSL("localhost", 1995, context=context)
        client.user("alice")
        client.pass_("pw")
        assert client.stat() == (0, 0)
        client.quit()
        delivered = subprocess.run(
            [*POPBOX, "deliver", "alice"],
            input=b"From: bob@example.com\r\nSubject: quickstart parcel\r\n\r\nhello\r\n",
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert delivered.returncode == 0, delivered.stderr
        found = subprocess.run(
            [*POPBOX, "archive", "search", "alice", "subject:parcel", "--json"],
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert found.returncode == 0, found.stderr
        assert b"quickstart parcel" in found.stdout
        page = httpx.get("http://127.0.0.1:8080/login", timeout=30)
        assert page.status_code == 200
        assert 'form id="login"' in page.text
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output.decode(errors="replace")
    assert b"popbox user add" in output


def test_scram_keys_from_the_cli_log_in_with_scram_plus_and_with_a_password(
    running: Running,
) -> None:
    """`popbox user add --scheme SCRAM-SHA-256` stores Dovecot-form keys; the served
    SCRAM-SHA-256-PLUS login binds to the certificate `popbox serve` presents, and
    USER/PASS verifies against the same keys."""
    from scramp import ScramClient

    result = running.popbox(
        "user", "add", "dana", "--password-stdin", "--scheme", "SCRAM-SHA-256",
        stdin=b"dana's pw\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    passwd = (running.directory / "popbox-data" / "passwd").read_text()
    assert "dana:{SCRAM-SHA-256}4096," in passwd
    assert running.popbox("deliver", "dana", stdin=MESSAGE).returncode == 0

    client = poplib.POP3_SSL("localhost", running.pop3s, context=running.client_context())
    sasl = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN", "LOGIN"]
    assert client.capa()["SASL"] == sasl
    scram = ScramClient(
        ["SCRAM-SHA-256-PLUS"], "dana", "dana's pw", ("tls-server-end-point", client.sock)
    )
    first = base64.b64encode(scram.get_client_first().encode()).decode()
    reply = client._shortcmd(f"AUTH SCRAM-SHA-256-PLUS {first}")
    scram.set_server_first(base64.b64decode(reply[2:]).decode())
    reply = client._shortcmd(base64.b64encode(scram.get_client_final().encode()).decode())
    scram.set_server_final(base64.b64decode(reply[2:]).decode())
    assert client._shortcmd("").startswith(b"+OK Logged in")
    assert client.stat()[0] == 1
    client.quit()

    client = poplib.POP3_SSL("localhost", running.pop3s, context=running.client_context())
    client.user("dana")
    assert client.pass_("dana's pw").startswith(b"+OK")
    client.quit()
