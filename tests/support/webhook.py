"""A webhook receiver for the collector's webhook sink: a ticket system stand-in.

``serve`` runs a ``Receiver`` (or a subclass that decides its replies) on 127.0.0.1
over HTTP or HTTPS; every request is kept with whether its HMAC signature checked
out against ``SECRET`` as docs/collector-webhook.md describes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

SECRET = "s3cret-webhook-key"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signature_ok: bool

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A ticket system stand-in: verifies the HMAC like docs/collector-webhook.md says."""

    def __init__(self) -> None:
        self.script: list[Reply] = [Reply()]
        self.requests: list[Received] = []
        self.stop = threading.Event()
        self.url = ""

    def reply_for(self, request: Received) -> Reply:
        # The last scripted reply repeats, so "500 forever" is a one-element script.
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


ReceiverT = TypeVar("ReceiverT", bound=Receiver)


def _verify(headers: dict[str, str], body: bytes) -> bool:
    timestamp = headers.get("X-Popbox-Timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
        return False
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    given = headers.get("X-Popbox-Signature", "")
    return hmac.compare_digest("sha256=" + expected.hexdigest(), given)


def serve(receiver: ReceiverT, context: ssl.SSLContext | None = None) -> Iterator[ReceiverT]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            headers = {k: v for k, v in self.headers.items()}
            received = Received(headers, body, _verify(headers, body))
            receiver.requests.append(received)
            reply = receiver.reply_for(received)
            if reply.delay and receiver.stop.wait(reply.delay):
                return
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    receiver.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield receiver
    finally:
        receiver.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
