"""SCRAM clients for the tests: scramp's over a raw POP3 connection, and GNU SASL's
``gsasl`` command (an independent implementation) relayed onto one."""

from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
from dataclasses import dataclass

from scramp import ScramClient

from support.pop3service import Raw

__all__ = ["ScrampLogin", "gsasl_login", "scramp_login"]


@dataclass
class ScrampLogin:
    """What a scramp client saw: the server's replies, in order, and whether it
    checked the server's signature (the server proved it holds the keys too)."""

    replies: list[bytes]
    server_verified: bool

    @property
    def last(self) -> bytes:
        return self.replies[-1]


def _challenge(line: bytes) -> str:
    assert line.startswith(b"+ "), line
    return base64.b64decode(line[2:].strip()).decode()


async def scramp_login(
    client: Raw,
    mechanism: str,
    username: str,
    password: str,
    *,
    channel_binding: tuple[str, bytes | ssl.SSLObject] | None = None,
    mechanisms: list[str] | None = None,
    initial_response: bool = False,
) -> ScrampLogin:
    """AUTH ``mechanism`` with scramp's client (greeting already read); stops at the
    first ``-ERR``. ``mechanisms`` is what scramp is told it may choose from (a client
    that binds but sees no -PLUS sends ``y``)."""
    scram = ScramClient(mechanisms or [mechanism], username, password, channel_binding)
    first = base64.b64encode(scram.get_client_first().encode()).decode()
    replies: list[bytes] = []
    if initial_response:
        await client.send(f"AUTH {mechanism} {first}\r\n".encode())
    else:
        await client.send(f"AUTH {mechanism}\r\n".encode())
        replies.append(await client.line())
        if not replies[-1].startswith(b"+ "):
            return ScrampLogin(replies, False)
        await client.send(f"{first}\r\n".encode())
    replies.append(await client.line())
    if not replies[-1].startswith(b"+ "):
        return ScrampLogin(replies, False)
    scram.set_server_first(_challenge(replies[-1]))
    final = base64.b64encode(scram.get_client_final().encode()).decode()
    await client.send(f"{final}\r\n".encode())
    replies.append(await client.line())
    if not replies[-1].startswith(b"+ "):
        return ScrampLogin(replies, False)
    scram.set_server_final(_challenge(replies[-1]))  # raises if the signature is wrong
    await client.send(b"\r\n")
    replies.append(await client.line())
    return ScrampLogin(replies, True)


async def gsasl_login(
    client: Raw, mechanism: str, username: str, password: str, *, authzid: str = ""
) -> list[bytes]:
    """AUTH ``mechanism`` with GNU SASL's ``gsasl`` in its stdin/stdout mode: every
    client message comes from it and every challenge goes to it. Returns the server's
    replies; the last is the login's outcome."""
    gsasl = shutil.which("gsasl")
    assert gsasl is not None
    args = [f"--mechanism={mechanism}", f"--authentication-id={username}"]
    args += [f"--password={password}", *([f"--authorization-id={authzid}"] if authzid else [])]
    process = await asyncio.create_subprocess_exec(
        gsasl,
        "--client",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    async def client_message() -> bytes:
        # Prompts go to stdout without a newline; the client's message ends the line.
        line = await asyncio.wait_for(stdout.readline(), 10)
        return line.rstrip(b"\n").rsplit(b" ", 1)[-1]

    try:
        assert (await asyncio.wait_for(stdout.readline(), 10)).strip() == mechanism.encode()
        stdin.write(b"\n\n")  # no tls-exporter, no tls-unique data
        await client.send(b"AUTH %s %s\r\n" % (mechanism.encode(), await client_message()))
        replies = [await client.line()]
        while replies[-1].startswith(b"+ "):
            stdin.write(replies[-1][2:].strip() + b"\n")
            await stdin.drain()
            await client.send(await client_message() + b"\r\n")
            replies.append(await client.line())
        return replies
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
