"""A tiny scripted POP3 server for misbehaving-server cases no real server shows on demand.

It is deliberately simple (plain TCP on 127.0.0.1, one client at a time) and
configurable: missing or duplicate UIDLs, STLS refused or absent, a login refused with
a response code, XOAUTH2 that accepts only one token.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field


@dataclass
class FakePop:
    messages: list[bytes]
    uidl: str = "ok"  # "ok" | "missing" | "duplicate" | "invalid"
    capabilities: list[str] = field(
        default_factory=lambda: ["USER", "UIDL", "TOP", "PIPELINING", "SASL PLAIN XOAUTH2"]
    )
    stls_reply: bytes | None = None  # when set, STLS is answered with it
    login_error: bytes | None = None  # e.g. b"-ERR [IN-USE] locked"
    good_token: str = "good-token"
    password: str = "secret"
    oversize_body: bool = False
    uid_shift: int = 0  # message n is listed with the UIDL of message n + shift
    list_size_offset: int = 0  # LIST reports sizes off by this much (sloppy servers)
    commands: list[str] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> FakePop:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _uid(self, index: int) -> str:
        if self.uidl == "duplicate":
            return "same"
        if self.uidl == "invalid":
            return f"bad uid {index}"[:70].replace(" ", "\x01")
        return f"uid-{index + self.uid_shift}"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(line: bytes | str) -> None:
            writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

        send("+OK fake ready <1.2@fake>")
        pending_delete: set[int] = set()
        try:
            while line := await reader.readline():
                text = line.decode().rstrip("\r\n")
                self.commands.append(text)
                verb, _, arg = text.partition(" ")
                verb = verb.upper()
                if verb == "CAPA":
                    send("+OK")
                    for item in self.capabilities:
                        send(item)
                    send(".")
                elif verb == "STLS":
                    send(self.stls_reply or b"-ERR no TLS here")
                elif verb == "USER":
                    send("+OK")
                elif verb == "PASS":
                    if self.login_error:
                        send(self.login_error)
                    else:
                        send("+OK" if arg == self.password else "-ERR [AUTH] wrong")
                elif verb == "AUTH":
                    await self._auth(arg, reader, send)
                elif verb == "LIST":
                    send("+OK")
                    for index, data in enumerate(self.messages, 1):
                        send(f"{index} {len(data) + self.list_size_offset}")
                    send(".")
                elif verb == "UIDL":
                    if self.uidl == "missing":
                        send("-ERR no UIDL")
                        continue
                    send("+OK")
                    for index in range(1, len(self.messages) + 1):
                        send(f"{index} {self._uid(index)}".encode("latin-1"))
                    send(".")
                elif verb in ("RETR", "TOP"):
                    number = int(arg.split()[0])
                    data = self.messages[number - 1]
                    if verb == "TOP":
                        data = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                    elif self.oversize_body:
                        data = data + b"z" * (3 * len(data) + 2 * 1024 * 1024) + b"\r\n"
                    send("+OK")
                    stuffed = data.replace(b"\r\n.", b"\r\n..")
                    writer.write(stuffed + b".\r\n")
                elif verb == "DELE":
                    pending_delete.add(int(arg))
                    send("+OK")
                elif verb == "QUIT":
                    self.deleted |= pending_delete
                    send("+OK bye")
                    break
                else:
                    send("+OK")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _auth(self, arg: str, reader: asyncio.StreamReader, send: object) -> None:
        assert callable(send)
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() == "PLAIN":
            if not initial:
                send("+ ")
                initial = (await reader.readline()).decode().strip()
            _, _user, password = base64.b64decode(initial).split(b"\0")
            send("+OK" if password.decode() == self.password else "-ERR [AUTH] wrong")
            return
        # XOAUTH2, two-step as Microsoft does it: "+ " then the token.
        send("+ ")
        response = base64.b64decode((await reader.readline()).strip()).decode()
        self.commands.append(f"<xoauth2 {response!r}>")
        if f"auth=Bearer {self.good_token}\x01" in response:
            send("+OK welcome")
            return
        send("+ " + base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode())
        await reader.readline()  # the client's empty line
        send("-ERR [AUTH] token rejected")
