"""TLS for the collector's client connections: one verifying context, one pin check.

The POP3 session and the IMAP sink connect to servers named in the config the same
way: certificates verified against the system's CAs or a configured ``ca_file``, at
least TLS 1.2, or, with ``tls_fingerprint``, the server's certificate pinned by its
SHA-256 instead of any chain check (mpop's ``tls_fingerprint`` works the same way).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path

__all__ = ["certificate_matches", "client_tls_context"]


class _ClientContext(ssl.SSLContext):
    """An SSLContext that checks (and sends as SNI) ``server_name`` whatever host name
    the library that wraps the socket passes: imaplib always passes the host it
    connected to, while ``tls_server_name`` may say the certificate names another."""

    server_name: str | None = None

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )


def client_tls_context(
    ca_file: Path | None, fingerprint: str | None, *, server_name: str | None = None
) -> ssl.SSLContext:
    """A verifying client context; a pinned ``fingerprint`` replaces the CA check (the
    caller then checks the pin with ``certificate_matches`` after the handshake).
    ``server_name``, when set, is the name checked and sent whatever host the socket
    was wrapped for."""
    context = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = server_name
    if fingerprint is not None:
        # The chain is not consulted: the fingerprint check after the handshake is
        # stricter than any CA.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def certificate_matches(der: bytes | None, fingerprint: str) -> bool:
    """Whether the peer's DER certificate has the SHA-256 ``fingerprint`` (64 hex)."""
    return bool(der) and hashlib.sha256(der or b"").hexdigest() == fingerprint
