"""curl's POP3 client (pop3:// with STLS, pop3s://) against popbox, certificates verified."""

from __future__ import annotations

import logging

import pytest

from support.interop import MESSAGES, PASSWORD, USER, InteropServer, require
from support.wire import wire

pytestmark = pytest.mark.interop


def _tls_sessions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "popbox.pop3" and "reason=" in r.getMessage()
    ]


async def _curl(server: InteropServer, url: str, *extra: str) -> bytes:
    curl = require("curl")
    status, out, err = await server.run(
        curl,
        "--silent",
        "--show-error",
        "--max-time",
        "30",
        "--cacert",
        str(server.ca),
        "--user",
        f"{USER}:{PASSWORD}",
        *extra,
        url,
    )
    assert status == 0, err.decode(errors="replace")
    return out


@pytest.mark.parametrize("number", [1, 2, 3])
async def test_curl_stls_retrieves_byte_exact(
    interop_server: InteropServer, caplog: pytest.LogCaptureFixture, number: int
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    url = f"pop3://127.0.0.1:{interop_server.plain_port}/{number}"
    body = await _curl(interop_server, url, "--ssl-reqd")
    assert body == wire(MESSAGES[number - 1])
    (line,) = _tls_sessions(caplog)
    assert "tls=yes" in line
    assert "retr=1/" in line


async def test_curl_implicit_tls_retrieves_byte_exact(interop_server: InteropServer) -> None:
    url = f"pop3s://localhost:{interop_server.tls_port}/1"
    assert await _curl(interop_server, url) == wire(MESSAGES[0])


async def test_curl_lists_sizes_that_match_retr(interop_server: InteropServer) -> None:
    url = f"pop3s://localhost:{interop_server.tls_port}/"
    listing = await _curl(interop_server, url)
    expected = "".join(f"{i} {len(wire(m))}\r\n" for i, m in enumerate(MESSAGES, start=1))
    assert listing.decode() == expected


async def test_curl_dele_is_committed_by_its_quit(interop_server: InteropServer) -> None:
    url = f"pop3://127.0.0.1:{interop_server.plain_port}/2"
    await _curl(interop_server, url, "--ssl-reqd", "--request", "DELE", "--list-only")
    assert await interop_server.stored() == [MESSAGES[0], MESSAGES[2]]


async def test_curl_refuses_a_server_its_ca_did_not_sign(
    interop_server: InteropServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The verification in the other tests is real: a wrong CA makes curl fail."""
    import trustme

    other = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    curl = require("curl")
    status, _, _ = await interop_server.run(
        curl,
        "--silent",
        "--cacert",
        str(other),
        "--user",
        f"{USER}:{PASSWORD}",
        f"pop3s://localhost:{interop_server.tls_port}/1",
    )
    assert status != 0
