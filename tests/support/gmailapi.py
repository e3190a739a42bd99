"""A local Gmail API for the Gmail sink: the endpoints it calls, as Google documents them.

``GmailApi`` keeps one mailbox (messages with label ids and an internal date, system
and user labels) and answers, over HTTPS on 127.0.0.1 (``serve_gmail``):

- ``POST /upload/gmail/v1/users/{user}/messages/import`` with ``uploadType=multipart``
  (a multipart/related body: JSON metadata, then the message/rfc822 part) or
  ``uploadType=resumable`` (metadata and ``X-Upload-Content-*``; the session URI in
  ``Location``), and ``PUT`` to a session URI: the bytes, ``Content-Range`` for the
  rest, ``bytes */N`` for the status (308 with ``Range``, or the finished message);
- ``GET``/``POST /gmail/v1/users/{user}/labels`` (409 for a name that exists);
- ``GET .../messages?q=rfc822msgid:ID&includeSpamTrash=...`` and
  ``GET .../messages/{id}?format=metadata&metadataHeaders=...``.

Every request needs ``Authorization: Bearer`` with one of ``tokens`` or a token the
fake OAuth server (``support.oauth.FakeAuthServer``) issued and has not revoked.
Errors have Google's shape: ``{"error": {"code", "message", "errors": [{"reason"}],
"status"}}``. ``fail`` scripts faults for the next matching requests: 429 with
Retry-After, 403 rateLimitExceeded, 500, 401, 400, a connection dropped after the
whole body arrived (the import happened, its answer is lost) or part-way through an
upload. Query parameters and the multipart structure are checked strictly: a request
the real API would refuse is refused here too, with 400.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support.fetch import fetch_toml
from support.oauth import FakeAuthServer

TOKEN = "gmail-test-token"
# A token_command for the sink's [oauth] table that prints TOKEN.
TOKEN_COMMAND = f"{sys.executable} -c \"print('{TOKEN}')\""

SYSTEM_LABELS = (
    "INBOX",
    "UNREAD",
    "STARRED",
    "IMPORTANT",
    "SENT",
    "DRAFT",
    "SPAM",
    "TRASH",
    "CHAT",
    "CATEGORY_PERSONAL",
    "CATEGORY_SOCIAL",
    "CATEGORY_PROMOTIONS",
    "CATEGORY_UPDATES",
    "CATEGORY_FORUMS",
)
_BOOLEAN = ("true", "false")
_REASONS = {
    400: ("badRequest", "INVALID_ARGUMENT"),
    401: ("authError", "UNAUTHENTICATED"),
    403: ("rateLimitExceeded", "PERMISSION_DENIED"),
    404: ("notFound", "NOT_FOUND"),
    409: ("duplicate", "ALREADY_EXISTS"),
    413: ("uploadTooLarge", "FAILED_PRECONDITION"),
    429: ("rateLimitExceeded", "RESOURCE_EXHAUSTED"),
    500: ("backendError", "INTERNAL"),
}


@dataclass
class Fault:
    """What the next ``times`` matching requests get instead of an answer.

    ``kind``: "status" (``status`` with ``reason`` and ``retry_after``), "drop" (the
    whole body is read and acted on, then the connection closes without an answer),
    "cut" (only ``after_bytes`` of the body are read, nothing is acted on, the
    connection closes). ``endpoint``: "import" (the multipart POST or the resumable
    start), "upload" (a PUT of bytes to a session), "labels", "list", "get", "any".
    ``match``: only requests whose body contains these bytes.
    """

    endpoint: str
    kind: str = "status"
    status: int = 500
    reason: str | None = None
    message: str = "Backend Error"
    retry_after: str | None = None
    times: int = 1
    after_bytes: int = 0
    match: bytes | None = None
    then: Callable[[], object] | None = None
    """Runs when the fault is taken (another client acting meanwhile)."""


@dataclass
class Stored:
    id: str
    raw: bytes
    label_ids: list[str]
    internal_date: int
    params: dict[str, str]

    def header(self, name: str) -> list[str]:
        headers = BytesHeaderParser(policy=compat32).parsebytes(_header_block(self.raw))
        return [str(value) for value in headers.get_all(name) or ()]


@dataclass
class Session:
    """A resumable upload: its metadata and the bytes received so far."""

    params: dict[str, str]
    label_ids: list[str]
    length: int
    received: bytearray = field(default_factory=bytearray)
    done: Stored | None = None


@dataclass
class GmailApi:
    """One Gmail mailbox behind the documented endpoints; see the module docstring."""

    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    auth: FakeAuthServer | None = None
    url: str = ""
    messages: dict[str, Stored] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        for name in SYSTEM_LABELS:
            self.labels[name] = {"id": name, "name": name, "type": "system"}

    # -- what tests look at -----------------------------------------------------

    def fail(self, endpoint: str, kind: str = "status", **fields: Any) -> Fault:
        fault = Fault(endpoint, kind, **fields)
        with self.lock:
            self.faults.append(fault)
        return fault

    def add_user_label(self, name: str) -> str:
        with self.lock:
            label_id = f"Label_{next(self.counter)}"
            self.labels[label_id] = {"id": label_id, "name": name, "type": "user"}
            return label_id

    def label_names(self, stored: Stored) -> list[str]:
        return [self.labels[i]["name"] for i in stored.label_ids]

    def raw_messages(self) -> list[bytes]:
        with self.lock:
            return sorted(m.raw for m in self.messages.values())

    def calls(self, method: str, path_part: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and path_part in p)

    # -- faults -------------------------------------------------------------------

    def take_fault(self, endpoint: str, body: bytes) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.endpoint not in (endpoint, "any") or fault.times <= 0:
                    continue
                if fault.match is not None and fault.match not in body:
                    continue
                fault.times -= 1
                if fault.then is not None:
                    fault.then()
                return fault
        return None

    # -- the mailbox ----------------------------------------------------------------

    def token_ok(self, header: str | None) -> bool:
        if header is None or not header.startswith("Bearer "):
            return False
        token = header[len("Bearer ") :]
        if token in self.tokens:
            return True
        return self.auth is not None and token in self.auth.access_tokens

    def store(self, raw: bytes, label_ids: list[str], params: dict[str, str]) -> Stored:
        with self.lock:
            internal = int(time.time() * 1000)
            if params.get("internalDateSource", "receivedTime") == "dateHeader":
                internal = _date_ms(raw) or internal
            stored = Stored(f"{next(self.counter):016x}", raw, label_ids, internal, params)
            self.messages[stored.id] = stored
            return stored

    def resource(self, stored: Stored) -> dict[str, Any]:
        return {"id": stored.id, "threadId": stored.id, "labelIds": stored.label_ids}


def _header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def _date_ms(raw: bytes) -> int | None:
    headers = BytesHeaderParser(policy=compat32).parsebytes(_header_block(raw))
    value = headers.get("Date")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    return int(when.timestamp() * 1000) if when.tzinfo is not None else None


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def error_document(status: int, message: str, reason: str | None = None) -> dict[str, Any]:
    default_reason, status_name = _REASONS.get(status, ("unknown", "UNKNOWN"))
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [
                {"message": message, "domain": "global", "reason": reason or default_reason}
            ],
            "status": status_name,
        }
    }


def _check_import_params(query: dict[str, list[str]], upload_type: str) -> dict[str, str]:
    params = {key: values[-1] for key, values in query.items()}
    allowed = {
        "uploadType",
        "internalDateSource",
        "neverMarkSpam",
        "processForCalendar",
        "deleted",
        "alt",
    }
    unknown = set(params) - allowed
    if unknown:
        raise ApiError(400, f"Invalid JSON payload received. Unknown name {sorted(unknown)}")
    if params.get("uploadType") != upload_type:
        raise ApiError(400, f"uploadType must be {upload_type}")
    if params.get("internalDateSource", "dateHeader") not in ("dateHeader", "receivedTime"):
        raise ApiError(400, "Invalid value at 'internal_date_source'")
    for key in ("neverMarkSpam", "processForCalendar", "deleted"):
        if params.get(key, "false") not in _BOOLEAN:
            raise ApiError(400, f"Invalid value at '{key}'")
    return params


def _split_multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON metadata and the message of a multipart/related upload, strictly."""
    match = re.fullmatch(r'multipart/related;\s*boundary="?([^";]+)"?', content_type.strip())
    if match is None:
        raise ApiError(400, f"Content-Type must be multipart/related, not {content_type!r}")
    delimiter = b"--" + match.group(1).encode("ascii")
    parts = body.split(b"\r\n" + delimiter)
    if not body.startswith(delimiter + b"\r\n") or len(parts) != 3:
        raise ApiError(400, "Malformed multipart body.")
    first = parts[0][len(delimiter) + 2 :]
    if parts[2] not in (b"--", b"--\r\n"):
        raise ApiError(400, "Malformed multipart body: no closing delimiter.")
    meta_head, _, meta_body = first.partition(b"\r\n\r\n")
    if not meta_head.lower().startswith(b"content-type: application/json"):
        raise ApiError(400, "The first part must be the JSON metadata.")
    if not parts[1].startswith(b"\r\n"):
        raise ApiError(400, "Malformed multipart body.")
    media_head, sep, media = parts[1][2:].partition(b"\r\n\r\n")
    if not sep or media_head.lower() != b"content-type: message/rfc822":
        raise ApiError(400, "Media type 'application/octet-stream' is not supported.")
    try:
        metadata = json.loads(meta_body)
    except ValueError as exc:
        raise ApiError(400, "Invalid JSON payload received.") from exc
    if not isinstance(metadata, dict):
        raise ApiError(400, "Invalid JSON payload received.")
    return metadata, media


def _label_ids(api: GmailApi, metadata: dict[str, Any]) -> list[str]:
    unknown = set(metadata) - {"labelIds"}
    if unknown:
        raise ApiError(400, f"Invalid JSON payload received. Unknown name {sorted(unknown)}")
    ids = metadata.get("labelIds", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(400, "Invalid labelIds")
    for label_id in ids:
        if label_id not in api.labels:
            raise ApiError(400, f"Invalid label: {label_id}")
        if label_id in ("DRAFT", "CHAT"):
            raise ApiError(400, f"Invalid label: {label_id}")
    return list(ids)


def _check_message(raw: bytes) -> None:
    if not raw or b":" not in _header_block(raw).split(b"\r\n", 1)[0]:
        raise ApiError(400, "Invalid message: no header fields")


def serve_gmail(api: GmailApi, context: ssl.SSLContext) -> Iterator[GmailApi]:
    """Run ``api`` over HTTPS on 127.0.0.1 until the generator is closed."""
    prefix = "/gmail/v1/users/me"

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps httpx's connection pool honest about reuse and broken pipes.
        protocol_version = "HTTP/1.1"

        def _reply(
            self,
            status: int,
            document: dict[str, Any] | None,
            headers: dict[str, str] | None = None,
        ) -> None:
            body = json.dumps(document).encode() if document is not None else b""
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if document is not None:
                self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _drop(self) -> None:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

        def _body(self, fault: Fault | None) -> bytes | None:
            length = int(self.headers.get("Content-Length", "0"))
            if fault is not None and fault.kind == "cut":
                self.rfile.read(min(length, fault.after_bytes))
                return None
            return self.rfile.read(length)

        def _handle(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            path = url.path
            with api.lock:
                api.requests.append((method, path, query))
            endpoint = _endpoint(method, path, prefix)
            length = int(self.headers.get("Content-Length", "0"))
            peek_fault = None
            if endpoint in ("import", "upload") and length:
                # A "cut" fault decides before the body is read; the others after.
                with api.lock:
                    peek_fault = next(
                        (
                            f
                            for f in api.faults
                            if f.kind == "cut" and f.times > 0 and f.endpoint == endpoint
                        ),
                        None,
                    )
                    if peek_fault is not None:
                        peek_fault.times -= 1
            body = self._body(peek_fault)
            if body is None:
                self._drop()
                return
            if len(body) < length:
                # The client went away mid-body (killed): Google keeps the part of a
                # resumable upload that arrived, and acts on nothing else.
                if endpoint == "upload":
                    self._keep_partial(path, body)
                return
            if not api.token_ok(self.headers.get("Authorization")):
                self._reply(
                    401,
                    error_document(401, "Invalid Credentials"),
                    {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
                )
                return
            fault = api.take_fault(endpoint, body)
            if fault is not None and fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._reply(
                    fault.status, error_document(fault.status, fault.message, fault.reason), headers
                )
                return
            try:
                status, document, headers = self._dispatch(method, path, query, body)
            except ApiError as exc:
                self._reply(exc.status, error_document(exc.status, exc.message, exc.reason))
                return
            if fault is not None and fault.kind == "drop":
                self._drop()  # acted on; the answer is lost
                return
            self._reply(status, document, headers)

        def _dispatch(
            self, method: str, path: str, query: dict[str, list[str]], body: bytes
        ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
            if method == "POST" and path == f"/upload{prefix}/messages/import":
                upload_type = query.get("uploadType", [""])[-1]
                if upload_type == "resumable":
                    return self._start_session(query, body)
                params = _check_import_params(query, "multipart")
                metadata, raw = _split_multipart(self.headers.get("Content-Type", ""), body)
                label_ids = _label_ids(api, metadata)
                _check_message(raw)
                return 200, api.resource(api.store(raw, label_ids, params)), {}
            if method == "PUT" and path.startswith("/upload/sessions/"):
                return self._put(path.rsplit("/", 1)[1], body)
            if path == f"{prefix}/labels":
                if method == "GET":
                    with api.lock:
                        return 200, {"labels": list(api.labels.values())}, {}
                if method == "POST":
                    return self._create_label(body)
            if method == "GET" and path == f"{prefix}/messages":
                return self._list(query)
            if method == "GET" and path.startswith(f"{prefix}/messages/"):
                return self._get(path.rsplit("/", 1)[1], query)
            raise ApiError(404, "Not Found")

        def _keep_partial(self, path: str, body: bytes) -> None:
            with api.lock:
                session = api.sessions.get(path.rsplit("/", 1)[1])
                range_start = re.fullmatch(
                    r"bytes (\d+)-\d+/\d+", self.headers.get("Content-Range", "")
                )
                start = int(range_start.group(1)) if range_start else 0
                if session is not None and session.done is None and start == len(session.received):
                    session.received += body

        def _start_session(
            self, query: dict[str, list[str]], body: bytes
        ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
            params = _check_import_params(query, "resumable")
            if self.headers.get("X-Upload-Content-Type") != "message/rfc822":
                raise ApiError(400, "X-Upload-Content-Type must be message/rfc822")
            length = self.headers.get("X-Upload-Content-Length", "")
            if not length.isdigit():
                raise ApiError(400, "X-Upload-Content-Length is required")
            if not self.headers.get("Content-Type", "").startswith("application/json"):
                raise ApiError(400, "The metadata must be JSON")
            metadata = json.loads(body or b"{}")
            label_ids = _label_ids(api, metadata)
            with api.lock:
                session_id = f"s{next(api.counter)}"
                api.sessions[session_id] = Session(params, label_ids, int(length))
            location = f"{api.url}/upload/sessions/{session_id}?upload_id={session_id}"
            return 200, None, {"Location": location}

        def _put(
            self, session_id: str, body: bytes
        ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
            with api.lock:
                session = api.sessions.get(session_id)
            if session is None:
                raise ApiError(404, "No such upload session")
            content_range = self.headers.get("Content-Range")
            if session.done is not None:
                return 200, api.resource(session.done), {}
            if content_range == f"bytes */{session.length}":
                return self._progress(session)
            start = 0
            if content_range is not None:
                match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range)
                if match is None or int(match.group(3)) != session.length:
                    raise ApiError(400, f"Bad Content-Range {content_range!r}")
                start = int(match.group(1))
                if int(match.group(2)) - start + 1 != len(body):
                    raise ApiError(400, "Content-Range does not match the body")
            if start != len(session.received):
                raise ApiError(400, f"Upload must continue at {len(session.received)}")
            session.received += body
            if len(session.received) > session.length:
                raise ApiError(400, "More bytes than X-Upload-Content-Length")
            if len(session.received) < session.length:
                return self._progress(session)
            raw = bytes(session.received)
            _check_message(raw)
            session.done = api.store(raw, session.label_ids, session.params)
            return 200, api.resource(session.done), {}

        def _progress(self, session: Session) -> tuple[int, None, dict[str, str]]:
            if session.done is not None:
                return 200, None, {}
            headers = {"Range": f"bytes=0-{len(session.received) - 1}"} if session.received else {}
            return 308, None, headers

        def _create_label(self, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
            document = json.loads(body)
            name = document.get("name")
            if not isinstance(name, str) or not name:
                raise ApiError(400, "Invalid label name")
            with api.lock:
                taken = any(
                    label["name"].casefold() == name.casefold() for label in api.labels.values()
                )
                if taken:
                    raise ApiError(409, "Label name exists or conflicts", "duplicate")
                label_id = api.add_user_label(name)
                label = api.labels[label_id] | {
                    "labelListVisibility": str(document.get("labelListVisibility")),
                    "messageListVisibility": str(document.get("messageListVisibility")),
                }
                api.labels[label_id] = label
                return 200, label, {}

        def _list(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any], dict[str, str]]:
            q = query.get("q", [""])[-1]
            if not q.startswith("rfc822msgid:"):
                raise ApiError(400, f"this local API only searches rfc822msgid:, not {q!r}")
            wanted = q[len("rfc822msgid:") :].strip().strip("<>")
            spam_trash = query.get("includeSpamTrash", ["false"])[-1] == "true"
            found = []
            with api.lock:
                for stored in api.messages.values():
                    if not spam_trash and {"SPAM", "TRASH"} & set(stored.label_ids):
                        continue
                    ids = [value.strip().strip("<>") for value in stored.header("Message-ID")]
                    if wanted in ids:
                        found.append({"id": stored.id, "threadId": stored.id})
            document: dict[str, Any] = {"resultSizeEstimate": len(found)}
            if found:
                document["messages"] = found  # Gmail leaves the key out when none match
            return 200, document, {}

        def _get(
            self, message_id: str, query: dict[str, list[str]]
        ) -> tuple[int, dict[str, Any], dict[str, str]]:
            if query.get("format", ["full"])[-1] != "metadata":
                raise ApiError(400, "this local API only answers format=metadata")
            with api.lock:
                stored = api.messages.get(message_id)
            if stored is None:
                raise ApiError(404, "Requested entity was not found.")
            names = query.get("metadataHeaders", [])
            headers = [
                {"name": name, "value": value} for name in names for value in stored.header(name)
            ]
            return (
                200,
                {
                    **api.resource(stored),
                    "snippet": "",
                    "sizeEstimate": len(stored.raw) + 17,  # an estimate, as Gmail says
                    "historyId": "1",
                    "internalDate": str(stored.internal_date),
                    "payload": {"mimeType": "text/plain", "headers": headers},
                },
                {},
            )

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    api.url = f"https://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield api
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-request (the crash tests) is expected, not a failure.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _endpoint(method: str, path: str, prefix: str) -> str:
    if path.startswith("/upload/gmail/"):
        return "import"
    if path.startswith("/upload/sessions/"):
        return "upload"
    if path == f"{prefix}/labels":
        return "labels"
    if path == f"{prefix}/messages":
        return "list"
    return "get"


def sink_table(api: GmailApi, ca: Path, **fields: Any) -> dict[str, Any]:
    """A ``kind = "gmail"`` sink table for ``api`` (token from TOKEN_COMMAND, unpaced)."""
    table: dict[str, Any] = {
        "kind": "gmail",
        "api_base": api.url,
        "ca_file": str(ca),
        "oauth": {"token_source": "command", "token_command": TOKEN_COMMAND, "provider": "google"},
        "imports_per_second": 1000.0,
    }
    table.update(fields)
    return table


def gmail_sink_toml(api: GmailApi, ca: Path, **fields: Any) -> str:
    """``sink_table`` as TOML: one ``[[fetch.accounts.sinks]]`` table with its
    ``[fetch.accounts.sinks.oauth]``, for the account written just before it."""
    table = sink_table(api, ca, **fields)
    oauth = table.pop("oauth")
    body = fetch_toml(**table).split("\n", 1)[1]  # the pairs, without "[fetch]"
    oauth_body = fetch_toml(**oauth).split("\n", 1)[1]
    return f"\n[[fetch.accounts.sinks]]\n{body}\n[fetch.accounts.sinks.oauth]\n{oauth_body}"
