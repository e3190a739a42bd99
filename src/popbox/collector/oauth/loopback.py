"""Where a browser login's answer arrives: a loopback HTTP listener (RFC 8252 section 7.3)
or the redirected address pasted on standard input, whichever comes first.

The listener is on 127.0.0.1 (and ::1 when it can have the same port), answers only
``GET /`` with the expected ``state`` (compared in constant time), takes one answer
and then closes. Everything it reads is bounded: the request line, the header block,
the number of connections, the time a connection may take and the time the whole
login may take. A headless server (popbox on a server, the browser on a laptop) gets
its answer by paste: the browser ends on an error page at ``http://127.0.0.1:PORT/?code=...``
and the user copies that address into the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TextIO

from popbox.errors import CollectorError

__all__ = [
    "BROWSER_LOGIN_MAX_WAIT",
    "PASTED_URL_MAX",
    "LoopbackAnswer",
    "RedirectListener",
    "stdin_lines",
]

# Long enough to sign in with a second factor; authorization codes themselves live
# at most 10 minutes at Google and Microsoft, so waiting longer gains nothing.
BROWSER_LOGIN_MAX_WAIT: Final = 600.0
# Microsoft's codes run to about 2 KB; 16 KiB holds any real redirect address and
# is twice the request line most HTTP servers accept (nginx: 8 KiB).
REQUEST_LINE_MAX: Final = 16384
PASTED_URL_MAX: Final = REQUEST_LINE_MAX
# A browser sends a dozen header lines to 127.0.0.1 and no cookies worth the name.
HEADER_LINES_MAX: Final = 100
HEADER_BYTES_MAX: Final = 32768
# A browser sends its request at once; a connection that does not is closed.
CONNECTION_TIMEOUT: Final = 10.0
# A browser opens a few connections (page, favicon, preconnect); more is not a browser.
CONNECTIONS_MAX: Final = 16

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>popbox</title></head>
<body style="font-family: sans-serif; margin: 3em"><h1>{title}</h1><p>{text}</p></body></html>"""


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What an offered answer earns: an HTTP status and page, and the parameters when
    it is the one answer this login takes."""

    status: int
    title: str
    text: str
    parameters: dict[str, str] | None = None


class LoopbackAnswer:
    """Judges offered redirects against the expected ``state``; accepts exactly one."""

    def __init__(self, state: str) -> None:
        self._state = state.encode()
        self._accepted = False
        self.future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    def offer(self, query: str) -> _Verdict:
        """Judge the query string of a redirect; an accepted one reserves the answer
        (``deliver`` hands it over once the browser has its page)."""
        parameters: dict[str, str] = {}
        for name, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
            if len(values) != 1:
                return _Verdict(400, "Not a sign-in answer", f"{name} is given twice.")
            parameters[name] = values[0]
        state = parameters.get("state", "").encode()
        if not hmac.compare_digest(state, self._state):
            return _Verdict(
                400, "Not this sign-in", "This answer is not for the popbox login that is waiting."
            )
        if self._accepted:
            return _Verdict(409, "Already signed in", "popbox already has its answer.")
        if "error" not in parameters and not parameters.get("code"):
            return _Verdict(400, "Not a sign-in answer", "The address carries no code.")
        self._accepted = True
        if "error" in parameters:
            return _Verdict(
                200,
                "Sign-in refused",
                f"The sign-in ended with {parameters['error']}. You may close this page.",
                parameters,
            )
        return _Verdict(
            200, "Signed in", "popbox has the answer. You may close this page.", parameters
        )

    def deliver(self, parameters: dict[str, str]) -> None:
        if not self.future.done():
            self.future.set_result(parameters)


def _page(verdict: _Verdict) -> bytes:
    body = _PAGE.format(title=html.escape(verdict.title), text=html.escape(verdict.text)).encode()
    reason = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        409: "Conflict",
        414: "URI Too Long",
        431: "Request Header Fields Too Large",
    }
    head = (
        f"HTTP/1.1 {verdict.status} {reason.get(verdict.status, 'Error')}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Referrer-Policy: no-referrer\r\n"
        "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class RedirectListener:
    """The loopback listener of one browser login; ``async with`` opens and closes it."""

    def __init__(self, port: int = 0) -> None:
        self._requested_port = port
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._answer: LoopbackAnswer | None = None
        self.port = 0

    async def __aenter__(self) -> RedirectListener:
        try:
            server = await asyncio.start_server(
                self._connection, "127.0.0.1", self._requested_port, limit=REQUEST_LINE_MAX
            )
        except OSError as exc:
            raise CollectorError(
                f"cannot listen on 127.0.0.1:{self._requested_port}: {exc.strerror}"
            ) from exc
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        # A redirect to "localhost" may reach ::1 first; that listener is a courtesy.
        with contextlib.suppress(OSError):
            self._servers.append(
                await asyncio.start_server(
                    self._connection, "::1", self.port, limit=REQUEST_LINE_MAX
                )
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        for server in self._servers:
            await server.wait_closed()

    def redirect_uri(self, host: str = "127.0.0.1") -> str:
        """The redirect URI to send with the request: this listener's root (RFC 8252
        section 7.3: ``http``, a loopback host, the port; the browser asks for ``/``)."""
        return f"http://{host}:{self.port}"

    def expect(self, state: str) -> None:
        """Take answers for ``state`` from now on: before the address is shown, since
        a fast browser may be back before ``wait`` is called."""
        self._answer = LoopbackAnswer(state)

    async def wait(
        self,
        *,
        max_wait: float = BROWSER_LOGIN_MAX_WAIT,
        pasted: Callable[[], Iterator[str]] | None = None,
        echo: Callable[[str], None] = print,
    ) -> dict[str, str]:
        """The redirect's parameters (``code`` and ``state``, or ``error``) once the
        browser or the user delivered them; CollectorError after ``max_wait`` seconds."""
        answer = self._answer
        if answer is None:
            raise RuntimeError("RedirectListener.wait before expect")
        reader = None
        if pasted is not None:
            reader = asyncio.create_task(self._read_pasted(pasted, answer, echo))
        try:
            async with asyncio.timeout(max_wait):
                return await answer.future
        except TimeoutError as exc:
            minutes = max(1, round(max_wait / 60))
            raise CollectorError(
                f"browser login: no answer within {minutes} minute(s); run the command again"
            ) from exc
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    @staticmethod
    async def _read_pasted(
        pasted: Callable[[], Iterator[str]],
        answer: LoopbackAnswer,
        echo: Callable[[str], None],
    ) -> None:
        """Feed pasted lines to ``answer`` from a daemon thread: a blocked read of
        standard input cannot be cancelled, and must not keep the process alive."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def post(line: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(lines.put_nowait, line)

        def read() -> None:
            try:
                for line in pasted():
                    post(line)
            finally:
                post(None)

        threading.Thread(target=read, name="popbox-oauth-paste", daemon=True).start()
        while (line := await lines.get()) is not None:
            line = line.strip()
            if not line:
                continue
            query = urllib.parse.urlsplit(line).query if "?" in line else line
            verdict = answer.offer(query)
            if verdict.parameters is not None:
                answer.deliver(verdict.parameters)
                return
            echo(f"{verdict.title}: {verdict.text} Paste the whole address again.")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._handlers) >= CONNECTIONS_MAX:
            writer.close()
            return
        self._handlers.add(task)
        verdict: _Verdict | None = None
        try:
            async with asyncio.timeout(CONNECTION_TIMEOUT):
                verdict = await self._request(reader)
                writer.write(_page(verdict))
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # a browser that went away, or not a browser: nothing more to say
        finally:
            self._handlers.discard(task)
            # The answer is delivered after its page went out (the login may end the
            # process), and even when the browser left before reading it.
            if verdict is not None and verdict.parameters is not None and self._answer:
                self._answer.deliver(verdict.parameters)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(CONNECTION_TIMEOUT):
                    await writer.wait_closed()

    async def _request(self, reader: asyncio.StreamReader) -> _Verdict:
        try:
            request_line = await reader.readuntil(b"\n")
        except (asyncio.LimitOverrunError, ValueError):
            return _Verdict(414, "Address too long", "popbox does not read this request.")
        header_bytes = 0
        for _ in range(HEADER_LINES_MAX + 1):
            try:
                line = await reader.readuntil(b"\n")
            except (asyncio.LimitOverrunError, ValueError):
                return _Verdict(431, "Headers too large", "popbox does not read this request.")
            header_bytes += len(line)
            if header_bytes > HEADER_BYTES_MAX:
                return _Verdict(431, "Headers too large", "popbox does not read this request.")
            if line in (b"\r\n", b"\n"):
                break
        else:
            return _Verdict(431, "Too many headers", "popbox does not read this request.")
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _Verdict(400, "Not HTTP", "popbox does not read this request.")
        method, target, _ = parts
        if method != "GET":
            return _Verdict(405, "Not allowed", "Only the sign-in redirect comes here.")
        split = urllib.parse.urlsplit(target)
        if split.path != "/" or self._answer is None:
            return _Verdict(404, "Not found", "Only the sign-in redirect comes here.")
        return self._answer.offer(split.query)


def stdin_lines(stream: TextIO) -> Callable[[], Iterator[str]]:
    """Lines pasted on ``stream``, each cut at ``PASTED_URL_MAX`` characters (a longer
    one is skipped whole); ends at end of file or when the stream cannot be read."""

    def read() -> str:
        try:
            return stream.readline(PASTED_URL_MAX + 1)
        except (OSError, ValueError):
            return ""  # closed, or not readable here (no terminal): as end of file

    def lines() -> Iterator[str]:
        while line := read():
            if len(line) <= PASTED_URL_MAX or line.endswith("\n"):
                yield line
                continue
            while line and not line.endswith("\n"):  # too long: skip to its end
                line = read()

    return lines
