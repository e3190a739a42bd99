"""Bearer-token logins to popbox by clients people use: curl, mpop and popbox's own
collector, with tokens a local issuer signed and popbox checks against its keys."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from popbox.app import bearer_mechanisms
from popbox.auth.memory import MemoryPassDB
from popbox.config import AuthSettings, OAuthServerSettings
from support.fetch import account_entry, fetch_settings, maildir_messages, poll, tls_fields
from support.interop import (
    MESSAGES,
    PASSWORD,
    USER,
    InteropServer,
    interop_config,
    require,
    serving,
)
from support.issuer import AUDIENCE, TokenIssuer, serve_issuer
from support.wire import wire

pytestmark = pytest.mark.interop


@pytest.fixture
def issuer() -> Iterator[TokenIssuer]:
    yield from serve_issuer(TokenIssuer())


@pytest.fixture
async def oauth_server(
    tls_files: Any, server_context: ssl.SSLContext, tmp_path: Path, issuer: TokenIssuer
) -> AsyncIterator[InteropServer]:
    oauth = OAuthServerSettings(
        issuer=issuer.issuer, audience=[AUDIENCE], domains=["example.org"]
    )
    config = interop_config(auth=AuthSettings(oauth=oauth))
    passdb = MemoryPassDB({USER: PASSWORD})
    async with serving(
        config, passdb, server_context, tls_files, tmp_path, bearer_mechanisms(config)
    ) as server:
        yield server


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "token refused" in r.getMessage()]


# -- curl ---------------------------------------------------------------------------


async def _curl(server: InteropServer, token: str, *extra: str) -> tuple[int, bytes, bytes]:
    curl = require("curl")
    return await server.run(
        curl, "--silent", "--show-error", "--max-time", "30", "--cacert", str(server.ca),
        "--user", USER, "--oauth2-bearer", token, *extra,
        f"pop3s://localhost:{server.tls_port}/1",
    )


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_curl_logs_in_with_a_token(
    oauth_server: InteropServer, issuer: TokenIssuer, mechanism: str
) -> None:
    status, out, err = await _curl(
        oauth_server, issuer.token(), "--login-options", f"AUTH={mechanism}"
    )
    assert status == 0, err.decode(errors="replace")
    assert out == wire(MESSAGES[0])


async def test_curl_picks_oauthbearer_from_capa(
    oauth_server: InteropServer, issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    status, out, err = await _curl(oauth_server, issuer.token())
    assert status == 0, err.decode(errors="replace")
    assert out == wire(MESSAGES[0])
    assert any("OAUTHBEARER token of alice" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_curl_with_an_expired_token_is_refused(
    oauth_server: InteropServer, issuer: TokenIssuer, mechanism: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    token = issuer.token(exp=int(issuer.claims()["iat"]) - 600)
    status, out, _ = await _curl(oauth_server, token, "--login-options", f"AUTH={mechanism}")
    assert status != 0
    assert out == b""
    assert any("ExpiredSignature" in line for line in refusals(caplog))


async def test_curl_sees_a_temporary_failure_when_the_issuer_is_down(
    oauth_server: InteropServer, issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    token = issuer.token()
    issuer.down = True
    status, out, _ = await _curl(oauth_server, token)
    assert status != 0
    assert out == b""
    assert any("cannot check the token" in r.getMessage() for r in caplog.records)


# -- mpop ---------------------------------------------------------------------------


async def _mpop(server: InteropServer, token: str, mechanism: str) -> tuple[int, bytes]:
    mpop = require("mpop")
    maildir = server.workdir / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    token_file = server.workdir / "token"
    token_file.write_text(token)
    status, out, err = await server.run(
        mpop, "--host=localhost", f"--port={server.tls_port}", "--timeout=30", "--tls=on",
        "--tls-starttls=off", f"--tls-trust-file={server.ca}", f"--auth={mechanism}",
        f"--user={USER}", f"--passwordeval=cat {token_file}", f"--delivery=maildir,{maildir}",
        f"--uidls-file={server.workdir / 'uidls'}", "--received-header=off",
        "--only-new=off", "--keep=on", "--half-quiet",
    )
    return status, out + err


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
async def test_mpop_fetches_with_a_token(
    oauth_server: InteropServer, issuer: TokenIssuer, mechanism: str
) -> None:
    status, output = await _mpop(oauth_server, issuer.token(), mechanism)
    assert status == 0, output.decode(errors="replace")
    assert len(list((oauth_server.workdir / "Maildir" / "new").iterdir())) == len(MESSAGES)


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
async def test_mpop_with_a_token_for_another_audience_is_refused(
    oauth_server: InteropServer, issuer: TokenIssuer, mechanism: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    status, _ = await _mpop(oauth_server, issuer.token(aud="https://mail.google.com/"), mechanism)
    assert status != 0
    assert any("InvalidAudience" in line for line in refusals(caplog))
    assert not list((oauth_server.workdir / "Maildir" / "new").iterdir())


# -- popbox's own collector -------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
async def test_the_collector_fetches_from_popbox_with_a_token(
    oauth_server: InteropServer, issuer: TokenIssuer, tmp_path: Path, mechanism: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token())
    entry = account_entry(
        oauth_server.tls_port, tmp_path / "out", **tls_fields(oauth_server.ca),
        auth="oauth2", auth_mechanism=mechanism, password_env=None,
        oauth={"token_source": "command", "token_command": f"cat {token_file}"},
    )
    result = await poll(fetch_settings(tmp_path, entry))
    assert result.ok, result.error
    assert len(maildir_messages(tmp_path / "out")) == len(MESSAGES)


async def test_the_collector_with_a_rotated_out_key_is_refused_twice(
    oauth_server: InteropServer, issuer: TokenIssuer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token whose key the issuer no longer publishes: the collector asks its token
    source again once (force_refresh), and both tokens are refused."""
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    old = issuer.rotate()
    token = issuer.token(key=old)
    issuer.keys.remove(old)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    entry = account_entry(
        oauth_server.tls_port, tmp_path / "out", **tls_fields(oauth_server.ca),
        auth="oauth2", auth_mechanism="oauthbearer", password_env=None,
        oauth={"token_source": "command", "token_command": f"cat {token_file}"},
    )
    result = await poll(fetch_settings(tmp_path, entry))
    assert not result.ok
    assert len([line for line in refusals(caplog) if "no key" in line]) == 2
    assert await oauth_server.stored() == MESSAGES
