"""mpop (a pipelining POP3 client) against popbox: STLS and implicit TLS into a Maildir."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from support.interop import MESSAGES, PASSWORD, USER, InteropServer, require

pytestmark = pytest.mark.interop


async def _mpop(
    server: InteropServer, *, implicit_tls: bool, keep: bool, auth: str = "user"
) -> list[bytes]:
    mpop = require("mpop")
    maildir = server.workdir / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    password_file = server.workdir / "password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    port = server.tls_port if implicit_tls else server.plain_port
    status, out, err = await server.run(
        mpop,
        "--host=localhost",
        f"--port={port}",
        "--timeout=30",
        "--tls=on",
        f"--tls-starttls={'off' if implicit_tls else 'on'}",
        f"--tls-trust-file={server.ca}",
        f"--auth={auth}",
        f"--user={USER}",
        f"--passwordeval=cat {password_file}",
        f"--delivery=maildir,{maildir}",
        f"--uidls-file={server.workdir / 'uidls'}",
        "--received-header=off",
        "--only-new=off",
        f"--keep={'on' if keep else 'off'}",
        "--half-quiet",
    )
    assert status == 0, (out + err).decode(errors="replace")
    return [path.read_bytes() for path in sorted((maildir / "new").iterdir(), key=_mtime)]


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def _lf(message: bytes) -> bytes:
    data = message.replace(b"\r\n", b"\n")
    return data if data.endswith(b"\n") else data + b"\n"


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls", "implicit-tls"])
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "nokeep"])
async def test_mpop_delivers_to_maildir(
    interop_server: InteropServer,
    caplog: pytest.LogCaptureFixture,
    implicit_tls: bool,
    keep: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    delivered = await _mpop(interop_server, implicit_tls=implicit_tls, keep=keep)
    assert sorted(delivered) == sorted(_lf(m) for m in MESSAGES)
    assert await interop_server.stored() == (MESSAGES if keep else [])
    ends = [r.getMessage() for r in caplog.records if "reason=" in r.getMessage()]
    assert ends
    assert all("tls=yes" in line for line in ends)


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls", "implicit-tls"])
async def test_mpop_logs_in_with_scram_sha_256(
    scram_interop_server: InteropServer, implicit_tls: bool
) -> None:
    """mpop's GNU SASL proves the password against a stored {SCRAM-SHA-256} key, and
    checks the server's signature, without the password crossing the wire (the
    server refuses every password check, so only SCRAM can succeed)."""
    delivered = await _mpop(
        scram_interop_server, implicit_tls=implicit_tls, keep=True, auth="scram-sha-256"
    )
    assert sorted(delivered) == sorted(_lf(m) for m in MESSAGES)
