"""`popbox serve` with an [auth.oauth] table: curl logs in with tokens that popbox
checks by RFC 7662 introspection, with a client secret read from a file."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.interop import require
from support.issuer import AUDIENCE, INTROSPECTION_CLIENT, INTROSPECTION_SECRET, TokenIssuer
from support.issuer import serve_issuer as serve
from support.serverproc import ServerProcess, deliver_lmtp, make_server, running

MESSAGE = b"From: a@example.org\r\nSubject: token\r\n\r\nfetched with a token\r\n"


@pytest.fixture
def issuer() -> Iterator[TokenIssuer]:
    yield from serve(TokenIssuer())


@pytest.fixture
def server(tmp_path: Path, issuer: TokenIssuer) -> Iterator[ServerProcess]:
    secret = tmp_path / "srv" / "introspection.secret"
    secret.parent.mkdir()
    secret.write_text(INTROSPECTION_SECRET + "\n")
    secret.chmod(0o600)
    oauth = (
        "[auth.oauth]\n"
        'introspection_mode = "post"\n'
        f'introspection_url = "{issuer.introspection_url}"\n'
        f'client_id = "{INTROSPECTION_CLIENT}"\n'
        'client_secret_file = "introspection.secret"\n'
        f'audience = "{AUDIENCE}"\n'
        'domains = ["example.org"]\n'
    )
    with running(make_server(tmp_path / "srv", extra=oauth)) as process:
        yield process


def curl(server: ServerProcess, token: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [require("curl"), "--silent", "--show-error", "--max-time", "30",
         "--user", "alice", "--oauth2-bearer", token,
         f"pop3://127.0.0.1:{server.pop3_port}/1"],
        capture_output=True, timeout=60, check=False,
    )


def test_serve_offers_bearer_logins_and_checks_tokens_by_introspection(
    server: ServerProcess, issuer: TokenIssuer
) -> None:
    assert deliver_lmtp(server.lmtp_port, "alice", MESSAGE) == 250
    token = issuer.opaque_token()
    done = curl(server, token)
    assert done.returncode == 0, done.stderr.decode(errors="replace") + server.log_text()
    assert done.stdout.endswith(MESSAGE)  # after the trace headers
    assert issuer.count("/introspect") == 1
    issuer.revoke(token)
    assert curl(server, token).returncode != 0
    assert "token refused: inactive (introspection)" in server.log_text()
