"""A local token issuer on 127.0.0.1 for popbox's bearer-token logins.

``TokenIssuer`` signs JWT access tokens with real keys (RSA, EC P-256, Ed25519 from
``cryptography``, through PyJWT) and serves what popbox asks an issuer for, over
HTTP on loopback as Keycloak lays it out: OpenID discovery, the JWKS (keys can be
rotated in), and RFC 7662 introspection of opaque tokens (HTTP Basic for the
client). It can be taken down (503 everywhere), made slow, or made to answer with
an endless document, and it counts what it was asked.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

REALM = "/realms/mail"
AUDIENCE = "popbox"
INTROSPECTION_CLIENT = "popbox-server"
INTROSPECTION_SECRET = "introspect-s3cret"


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: Any

    @classmethod
    def new(cls, algorithm: str = "RS256", kid: str | None = None) -> SigningKey:
        if algorithm.startswith(("RS", "PS")):
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        return cls(kid or f"{algorithm.lower()}-{secrets.token_hex(4)}", algorithm, private)

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        family = {"RS": RSAAlgorithm, "PS": RSAAlgorithm, "ES": ECAlgorithm}.get(
            self.algorithm[:2], OKPAlgorithm
        )
        document: dict[str, Any] = json.loads(family.to_jwk(public))
        document.update(kid=self.kid, use="sig", alg=self.algorithm)
        return document


@functools.cache
def _first_key() -> SigningKey:
    """Every issuer starts with the same RSA key: generating one costs a tenth of a
    second, and what a test rotates in is fresh."""
    return SigningKey.new("RS256", kid="rs256-first")


@dataclass
class TokenIssuer:
    url: str = ""
    keys: list[SigningKey] = field(default_factory=lambda: [_first_key()])
    down: bool = False
    stall: float = 0.0
    huge_jwks: bool = False
    discovery: bool = True
    """False: the OpenID discovery document is missing (404), RFC 8414's is there."""
    opaque: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def issuer(self) -> str:
        return self.url + REALM

    @property
    def jwks_url(self) -> str:
        return self.issuer + "/protocol/openid-connect/certs"

    @property
    def introspection_url(self) -> str:
        return self.issuer + "/protocol/openid-connect/token/introspect"

    def count(self, suffix: str) -> int:
        with self.lock:
            return sum(1 for path in self.requests if path.endswith(suffix))

    def rotate(self, algorithm: str = "RS256") -> SigningKey:
        """A new key, published beside the old ones and signing from now on."""
        key = SigningKey.new(algorithm)
        with self.lock:
            self.keys.append(key)
        return key

    def claims(self, user: str = "alice@example.org", **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": AUDIENCE, "sub": f"id-{user}", "email": user,
            "preferred_username": user.partition("@")[0],
            "iat": now, "nbf": now, "exp": now + 300, "scope": "openid email pop",
        }
        claims.update(changes)
        return {name: value for name, value in claims.items() if value is not None}

    def token(
        self, user: str = "alice@example.org", *, key: SigningKey | None = None,
        headers: dict[str, Any] | None = None, **changes: Any,
    ) -> str:
        """A JWT access token for ``user``, signed by ``key`` (the newest by default);
        ``changes`` set or (None) drop claims."""
        key = key or self.keys[-1]
        return jwt.encode(
            self.claims(user, **changes), key.private, algorithm=key.algorithm,
            headers={"kid": key.kid, **(headers or {})},
        )

    def opaque_token(self, user: str = "alice@example.org", **changes: Any) -> str:
        """A token only introspection can tell about (as Keycloak's are to a client)."""
        token = secrets.token_urlsafe(24)
        with self.lock:
            self.opaque[token] = self.claims(user, **changes)
        return token

    def revoke(self, token: str) -> None:
        with self.lock:
            self.opaque.pop(token, None)

    # -- endpoints ----------------------------------------------------------------

    def get(self, path: str) -> tuple[int, Any]:
        if path == REALM + "/.well-known/openid-configuration" and self.discovery:
            return 200, self._metadata()
        if path == "/.well-known/oauth-authorization-server" + REALM:
            return 200, self._metadata()
        if path == urllib.parse.urlsplit(self.jwks_url).path:
            if self.huge_jwks:
                return 200, {"keys": [], "padding": "x" * (1024 * 1024)}
            with self.lock:
                return 200, {"keys": [key.jwk() for key in self.keys]}
        return 404, {"error": "not_found"}

    def introspect(self, authorization: str, form: dict[str, str]) -> tuple[int, Any]:
        expected = base64.b64encode(
            f"{INTROSPECTION_CLIENT}:{INTROSPECTION_SECRET}".encode()
        ).decode()
        if authorization != f"Basic {expected}":
            return 401, {"error": "invalid_client"}
        with self.lock:
            claims = self.opaque.get(form.get("token", ""))
        if claims is None:
            return 200, {"active": False}
        return 200, {"active": True, "token_type": "Bearer", **claims}

    def _metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "introspection_endpoint": self.introspection_url,
            "token_endpoint": self.issuer + "/protocol/openid-connect/token",
        }


def serve_issuer(state: TokenIssuer) -> Iterator[TokenIssuer]:
    """Run ``state`` on 127.0.0.1 until the generator is closed."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, document: Any) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # popbox stops reading an endless answer
                self.wfile.write(body)

        def _hold(self, path: str) -> bool:
            with state.lock:
                state.requests.append(path)
            if state.stall:
                time.sleep(state.stall)
            if state.down:
                self._answer(503, {"error": "temporarily_unavailable"})
                return True
            return False

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if not self._hold(path):
                self._answer(*state.get(path))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            path = self.path.partition("?")[0]
            if self._hold(path):
                return
            if path == urllib.parse.urlsplit(state.introspection_url).path:
                self._answer(*state.introspect(self.headers.get("Authorization", ""), form))
            else:
                self._answer(404, {"error": "not_found"})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        state.stall = 0.0
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
