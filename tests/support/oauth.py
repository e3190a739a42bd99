"""A local OAuth2 authorization server for the collector's token providers and Dovecot.

``FakeAuthServer`` speaks just enough OAuth2 (RFC 6749 token endpoint, an authorization
endpoint for the code flow with PKCE (RFC 7636, S256 only), RFC 8628 device
authorization, OpenID discovery for msal, RFC 7662 introspection for Dovecot) on
127.0.0.1, remembers every token it issued and can revoke them (what expiry looks
like from outside). ``serve_auth`` runs it over HTTP or, given a context, HTTPS.

The authorization endpoint plays the user too: it approves at once (or answers
``authorize_error``) and redirects to the client's ``redirect_uri``, so a test plays
the browser by fetching the address popbox prints and following the redirect.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_ID = "popbox-test-client"
CLIENT_SECRET = "client-s3cret"


@dataclass
class FakeAuthServer:
    """An authorization server that remembers what it issued and can revoke it."""

    url: str = ""
    expires_in: int = 3600
    rotate_refresh_tokens: bool = True
    device_pending_polls: int = 2
    authorize_error: str | None = None
    """Set: the "user" refuses (e.g. access_denied) instead of approving."""
    authorizations: list[dict[str, str]] = field(default_factory=list)
    codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    """Unredeemed authorization codes: code -> (code_challenge, redirect_uri, user)."""
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    access_tokens: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, user: str, *, refresh: bool = True) -> dict[str, Any]:
        number = next(self.counter)
        access = f"at-{user}-{number}"
        self.access_tokens[access] = user
        document: dict[str, Any] = {
            "access_token": access, "token_type": "Bearer", "expires_in": self.expires_in,
            # msal builds its account record from client_info (uid.utid).
            "client_info": base64.urlsafe_b64encode(
                json.dumps({"uid": user, "utid": "tenant"}).encode()
            ).decode().rstrip("="),
        }
        if refresh:
            token = f"rt-{user}-{number}"
            self.refresh_tokens[token] = user
            document["refresh_token"] = token
        return document

    def revoke_access_tokens(self) -> None:
        """What expiry looks like from outside: every token issued so far is dead."""
        with self.lock:
            self.access_tokens.clear()

    def grants(self, grant_type: str) -> int:
        return sum(1 for path, form in self.requests if form.get("grant_type") == grant_type)

    # -- endpoints --------------------------------------------------------------

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        grant = form.get("grant_type")
        if grant == "refresh_token":
            user = self.refresh_tokens.get(form.get("refresh_token", ""))
            if user is None:
                return 400, {"error": "invalid_grant", "error_description": "expired"}
            if self.rotate_refresh_tokens:
                del self.refresh_tokens[form["refresh_token"]]
                return 200, self.issue(user)
            return 200, self.issue(user, refresh=False)
        if grant == "authorization_code":
            return self.redeem(form)
        if grant == "client_credentials":
            if form.get("client_secret") != CLIENT_SECRET:
                return 401, {"error": "invalid_client"}
            return 200, self.issue("app", refresh=False)
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            if self.device_pending_polls > 0:
                self.device_pending_polls -= 1
                return 400, {"error": "authorization_pending"}
            return 200, self.issue("alice")
        return 400, {"error": "unsupported_grant_type"}

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """The authorization endpoint: (302, redirect address) or (400, why). Like a
        real server it never redirects to an unchecked client or redirect URI."""
        self.authorizations.append(query)
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != CLIENT_ID:
            return 400, "unknown client_id"
        if not redirect_uri.startswith(("http://127.0.0.1:", "http://localhost:")):
            return 400, "redirect_uri is not a loopback address"
        state = query.get("state", "")
        joiner = "&" if "?" in redirect_uri else "?"
        if self.authorize_error is not None:
            answer = {"error": self.authorize_error, "state": state}
        elif query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            answer = {"error": "invalid_request", "state": state}
        else:
            code = f"code-{next(self.counter)}"
            self.codes[code] = (query.get("code_challenge", ""), redirect_uri, "alice")
            answer = {"code": code, "state": state}
        return 302, redirect_uri + joiner + urllib.parse.urlencode(answer)

    def redeem(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The authorization_code grant: single use, same redirect_uri, and the PKCE
        verifier must hash (S256) to the challenge of the authorization request."""
        entry = self.codes.pop(form.get("code", ""), None)
        if entry is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown code"}
        challenge, redirect_uri, user = entry
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if base64.urlsafe_b64encode(digest).decode().rstrip("=") != challenge:
            return 400, {"error": "invalid_grant", "error_description": "code_verifier"}
        if form.get("redirect_uri") != redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri"}
        return 200, self.issue(user)

    def device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        return 200, {
            "device_code": "dev-code-1", "user_code": "WDJB-MJHT",
            "verification_uri": f"{self.url}/activate", "expires_in": 900, "interval": 0,
            "message": f"Open {self.url}/activate and enter WDJB-MJHT",
        }

    def introspect(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        user = self.access_tokens.get(form.get("token", ""))
        if user is None:
            return 200, {"active": False}
        return 200, {"active": True, "username": user, "scope": "pop"}

    def openid_configuration(self) -> dict[str, Any]:
        base = f"{self.url}/tenant"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
        }


def serve_auth(
    server_state: FakeAuthServer, context: ssl.SSLContext | None = None
) -> Iterator[FakeAuthServer]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path.endswith("/.well-known/openid-configuration"):
                self._reply(200, server_state.openid_configuration())
            elif path.endswith("/authorize"):
                with server_state.lock:
                    status, answer = server_state.authorize(dict(urllib.parse.parse_qsl(query)))
                if status == 302:
                    self.send_response(302)
                    self.send_header("Location", answer)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._reply(status, {"error": "invalid_request", "error_description": answer})
            elif path == "/introspect":  # Dovecot's introspection_mode = get
                form = dict(urllib.parse.parse_qsl(query))
                with server_state.lock:
                    server_state.requests.append((path, form))
                    self._reply(*server_state.introspect(form))
            else:
                self._reply(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            path = self.path.partition("?")[0]
            with server_state.lock:
                server_state.requests.append((path, form))
                if path.endswith("/token"):
                    self._reply(*server_state.token(form))
                elif path.endswith(("/device", "/devicecode")):
                    self._reply(*server_state.device(form))
                elif path == "/introspect":
                    self._reply(*server_state.introspect(form))
                else:
                    self._reply(404, {"error": "not_found"})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    server_state.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
