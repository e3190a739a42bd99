"""fetchmail against popbox over STLS and implicit TLS, with certificate checks, keep/nokeep.

fetchmail hands each message to an MDA script that writes it to a file. It adds a
Received: header and turns CRLF into LF, so the check is that each delivered file ends
with the original message (in LF form) and that deletions follow keep/nokeep.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from support.interop import MESSAGES, PASSWORD, USER, InteropServer, require

pytestmark = pytest.mark.interop

MDA_SCRIPT = """#!/bin/sh
# One file per message: fetchmail runs the MDA once for each.
exec cat > "$(mktemp "$1/msg.XXXXXXXX")"
"""


def _rcfile(server: InteropServer, *, implicit_tls: bool, keep: bool, outdir: Path) -> Path:
    mda = server.workdir / "mda.sh"
    mda.write_text(MDA_SCRIPT)
    mda.chmod(0o700)
    port = server.tls_port if implicit_tls else server.plain_port
    # "ssl" is implicit TLS; "sslproto tls1.2+" on the plain port makes STLS mandatory.
    tls = "ssl" if implicit_tls else "sslproto 'tls1.2+'"
    rc = server.workdir / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll localhost port {port} protocol pop3 timeout 30\n"
        f"  user '{USER}' there with password '{PASSWORD}' is '{USER}' here\n"
        f"  {tls} sslcertck sslcertfile '{server.ca}'\n"
        f'  mda "{mda} {outdir}"\n'
        f"  fetchall {'keep' if keep else 'nokeep'}\n"
    )
    # fetchmail refuses an rc file that others can read (it holds a password).
    rc.chmod(0o600)
    return rc


def _lf(message: bytes) -> bytes:
    # fetchmail drops every CR, bare ones too (curl's test shows they reach the wire).
    data = message.replace(b"\r", b"")
    return data if data.endswith(b"\n") else data + b"\n"


async def _fetch(server: InteropServer, *, implicit_tls: bool, keep: bool) -> list[bytes]:
    fetchmail = require("fetchmail")
    outdir = server.workdir / "delivered"
    outdir.mkdir(exist_ok=True)
    rc = _rcfile(server, implicit_tls=implicit_tls, keep=keep, outdir=outdir)
    status, out, err = await server.run(
        fetchmail,
        "--nodetach",
        "--daemon",
        "0",
        "--nosyslog",
        "--fetchmailrc",
        str(rc),
        "--idfile",
        str(server.workdir / "fetchids"),
        "--pidfile",
        str(server.workdir / "fetchmail.pid"),
        env={"FETCHMAILHOME": str(server.workdir)},
    )
    assert status == 0, (out + err).decode(errors="replace")
    files = sorted(outdir.iterdir(), key=lambda p: os.stat(p).st_mtime_ns)
    return [path.read_bytes() for path in files]


def _assert_delivered(delivered: list[bytes]) -> None:
    assert len(delivered) == len(MESSAGES)
    remaining = [_lf(m) for m in MESSAGES]
    for data in delivered:
        match = [m for m in remaining if data.endswith(m)]
        assert match, data[-200:]
        remaining.remove(match[0])


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls", "implicit-tls"])
async def test_fetchmail_keep_leaves_the_mail(
    interop_server: InteropServer, caplog: pytest.LogCaptureFixture, implicit_tls: bool
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    delivered = await _fetch(interop_server, implicit_tls=implicit_tls, keep=True)
    _assert_delivered(delivered)
    assert await interop_server.stored() == MESSAGES
    ends = [r.getMessage() for r in caplog.records if "reason=" in r.getMessage()]
    assert ends
    assert all("tls=yes" in line and f"user={USER}" in line for line in ends)


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls", "implicit-tls"])
async def test_fetchmail_nokeep_deletes_after_quit(
    interop_server: InteropServer, implicit_tls: bool
) -> None:
    delivered = await _fetch(interop_server, implicit_tls=implicit_tls, keep=False)
    _assert_delivered(delivered)
    assert await interop_server.stored() == []
