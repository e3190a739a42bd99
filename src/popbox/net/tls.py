"""Server-side TLS: the SSLContext both listeners use, the TLS layer every TLS session
runs on (``TlsLayer``), and the embedded default's self-signed certificate (generated
with ``cryptography`` when the files are missing).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from popbox.errors import ConfigError

__all__ = ["TLS_VERSIONS", "TlsLayer", "ensure_self_signed_cert", "make_server_context"]

# RFC 8996 deprecates TLS 1.0 and 1.1; RFC 9325 asks for 1.2 as the floor.
TLS_VERSIONS: Final = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
# The self-signed certificate is regenerated only when missing, and clients trust it by
# pinning it, so an expiry would only cause an outage; ten years outlives a deployment.
SELF_SIGNED_VALIDITY: Final = datetime.timedelta(days=3650)
# Clock skew between server and client must not make a fresh certificate "not yet valid".
SELF_SIGNED_BACKDATE: Final = datetime.timedelta(days=1)
# A private key readable by others is a leaked key.
KEY_FILE_MODE: Final = 0o600
# RFC 8446 section 5.1: a record carries at most 2^14 octets of plaintext, and one
# SSL_read returns at most one record, so this is all a read ever needs.
TLS_RECORD_PLAINTEXT: Final = 16 * 1024


def make_server_context(cert: Path, key: Path, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server SSLContext: ``min_version`` floor (never below TLS 1.2), no compression,
    no renegotiation, Python's vetted cipher defaults.

    Raises ConfigError for an unknown version; OSError or ssl.SSLError when the
    certificate or key cannot be loaded (the caller names the setting).
    """
    try:
        floor = TLS_VERSIONS[min_version]
    except KeyError as exc:
        raise ConfigError(
            f"tls.min_version: {min_version!r} is not one of {', '.join(TLS_VERSIONS)}"
        ) from exc
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = floor
    # CRIME (compression) and client-initiated renegotiation DoS; both are off by
    # default in current OpenSSL but a distribution's build must not decide for us.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Our order (forward-secret AEAD suites first) wins over an old client's preference.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


def ensure_self_signed_cert(cert: Path, key: Path, hostname: str) -> bool:
    """Generate a self-signed certificate for ``hostname`` when both files are missing.

    The certificate names ``hostname`` and ``localhost`` (DNS) and 127.0.0.1 and ::1
    (IP) so that loopback clients verifying against it succeed. Returns True when files
    were written, False when both already existed. One file without the other is a
    ConfigError: overwriting an operator's certificate is never right.
    """
    cert_exists, key_exists = cert.exists(), key.exists()
    if cert_exists and key_exists:
        return False
    if cert_exists != key_exists:
        present, missing = (cert, key) if cert_exists else (key, cert)
        raise ConfigError(f"tls: {present} exists but {missing} does not")
    private_key = ec.generate_private_key(ec.SECP256R1())
    certificate = _build_certificate(private_key, hostname)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    # The key goes first so that a crash in between leaves "key without cert", which
    # the next start reports instead of silently pairing a new cert with an old key.
    _write_atomically(key, key_pem, KEY_FILE_MODE)
    _write_atomically(cert, cert_pem, 0o644)
    return True


def _build_certificate(private_key: ec.EllipticCurvePrivateKey, hostname: str) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for dns in dict.fromkeys([hostname, "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(dns)))
        except ValueError:
            names.append(x509.DNSName(dns))
    for address in ("127.0.0.1", "::1"):
        entry = x509.IPAddress(ipaddress.ip_address(address))
        if entry not in names:
            names.append(entry)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SELF_SIGNED_BACKDATE)
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # CA:TRUE lets clients that want a trust anchor (curl --cacert, fetchmail
        # sslcertfile) use this very file as their CA; pathlen 0 keeps it from signing.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False
        )
        .sign(private_key, hashes.SHA256())
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so a reader never sees half a PEM file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# Decrypted bytes land here and are copied out at once, so the sessions of one process
# (one event loop thread) take turns with it: an idle TLS session keeps no read buffer
# of its own (uvloop's SSLProtocol allocates 256 KiB per connection; issue 6).
_read_buffer = bytearray(TLS_RECORD_PLAINTEXT)
_read_view = memoryview(_read_buffer)

# A layer's states: handshaking; open; closing or closed after a handshake (the session
# hears of the loss); failed handshake (nobody but ``on_failed`` hears of anything).
_HANDSHAKE: Final = 0
_OPEN: Final = 1
_CLOSED: Final = 2
_FAILED: Final = 3


class TlsLayer(asyncio.Protocol, asyncio.Transport):
    """Server-side TLS between a socket's transport and a session's protocol.

    To the socket's transport it is the protocol; to the session it is the transport
    (write, writelines, close, abort, pause/resume_reading, write buffer limits). It
    runs an ``ssl.SSLObject`` over two memory BIOs and does nothing else, which is
    what an idle session needs: no per-connection read buffer, no write backlog (the
    socket transport's buffer is the only one, so its flow control is the session's),
    and a few attributes. ``on_ready`` runs when the handshake is done, before any
    decrypted byte is delivered (it attaches the session); ``on_failed`` gets the
    handshake's error, timeout or loss; after a failed handshake the socket is aborted.

    A graceful ``close`` sends close_notify behind the queued data and closes the
    socket once that is flushed, without waiting for the client's close_notify (POP3
    has nothing to say after the last reply; RFC 8446 section 6.1 allows it). A
    close_notify from the client reaches the session as end of file.
    """

    __slots__ = (
        "_app",
        "_error",
        "_incoming",
        "_on_failed",
        "_on_ready",
        "_outgoing",
        "_raw",
        "_reading_paused",
        "_sslobj",
        "_state",
        "_timer",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        handshake_timeout: float,
        *,
        on_ready: Callable[[TlsLayer], None],
        on_failed: Callable[[BaseException], None] | None = None,
        app: asyncio.Protocol | None = None,
    ) -> None:
        self._app = app
        self._on_ready: Callable[[TlsLayer], None] | None = on_ready
        self._on_failed = on_failed
        self._raw: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._state = _HANDSHAKE
        self._reading_paused = False
        # Why a TLS error after the handshake ended the connection, for the session.
        self._error: ssl.SSLError | None = None
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            handshake_timeout, self._handshake_timed_out
        )

    def set_app(self, app: asyncio.Protocol) -> None:
        """The protocol decrypted bytes go to (from ``on_ready`` at the latest)."""
        self._app = app

    def take_over(self, transport: asyncio.Transport) -> None:
        """Run over a connected transport (STLS, or after a PROXY header).

        Whatever the transport reads from now on is TLS; it is told to read again.
        """
        transport.set_protocol(self)
        self.connection_made(transport)
        transport.resume_reading()

    # -- the socket side (asyncio.Protocol) -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        self._raw = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._state >= _CLOSED:
            return
        self._incoming.write(data)
        if self._state == _HANDSHAKE:
            self._handshake()
        if self._state == _OPEN and not self._reading_paused:
            self._deliver()

    def eof_received(self) -> bool | None:
        if self._state == _HANDSHAKE:
            self._fail(ConnectionResetError("connection closed during the TLS handshake"))
        elif self._state == _OPEN:
            # The client closed without close_notify (a truncation attack cannot hurt a
            # POP3 server: a command is complete only with its CRLF).
            self._end_of_input()
        return None

    def pause_writing(self) -> None:
        if self._state in (_OPEN, _CLOSED) and self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._state in (_OPEN, _CLOSED) and self._app is not None:
            self._app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        self._cancel_timer()
        if state == _HANDSHAKE:
            self._state = _FAILED
            self._report_failure(exc or ConnectionResetError("connection lost"))
        elif state != _FAILED:
            self._state = _CLOSED
            if self._app is not None:
                self._app.connection_lost(self._error or exc)

    # -- the session side (asyncio.Transport) -----------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # The pieces are one stream cut into full records: a RETR's +OK line rides in
        # the body's first record and the terminator in its last, and a record is
        # copied only where it spans two pieces. Encrypted a record at a time, so the
        # outgoing memory BIO (which keeps its largest buffer for good) never holds
        # more than one record: a session that sent a 256 KiB RETR batch through it
        # would otherwise keep ~350 KiB while it idles. The records still leave in one
        # gathered write, as uvloop's do. Nothing of the caller's is kept afterwards.
        if self._state != _OPEN:
            return
        encrypt, outgoing = self._sslobj.write, self._outgoing
        pieces: list[bytes] = []
        # The start of the next record: parts of pieces, fewer than a record's octets.
        held: list[bytes | bytearray | memoryview] = []
        held_size = 0
        try:
            for data in list_of_data:
                size = len(data)
                if held_size + size < TLS_RECORD_PLAINTEXT:
                    if size:
                        held.append(data)
                        held_size += size
                    continue
                view = memoryview(data)
                start = 0
                if held:
                    start = TLS_RECORD_PLAINTEXT - held_size
                    held.append(view[:start])
                    encrypt(b"".join(held))
                    pieces.append(outgoing.read())
                    held = []
                    held_size = 0
                end = size - TLS_RECORD_PLAINTEXT
                while start <= end:
                    encrypt(view[start : start + TLS_RECORD_PLAINTEXT])
                    pieces.append(outgoing.read())
                    start += TLS_RECORD_PLAINTEXT
                if start < size:
                    held.append(view[start:])
                    held_size = size - start
            if held:
                encrypt(held[0] if len(held) == 1 else b"".join(held))
                pieces.append(outgoing.read())
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        raw = self._raw
        if pieces and raw is not None and not raw.is_closing():
            raw.writelines(pieces)

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """Send close_notify behind what is queued; the socket closes once it is out."""
        raw = self._raw
        if self._state == _HANDSHAKE:
            self.abort()
            return
        if self._state != _OPEN:
            return
        self._state = _CLOSED
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is written; the client's is not waited for
        except ssl.SSLError:
            pass  # the connection is broken anyway; close it
        self._flush()
        if raw is not None:
            raw.close()

    def abort(self) -> None:
        if self._state == _HANDSHAKE:
            self._cancel_timer()
        raw = self._raw
        if raw is not None:
            raw.abort()
        elif self._state == _HANDSHAKE:
            self._state = _FAILED
            self._report_failure(ConnectionAbortedError("TLS handshake aborted"))

    def is_closing(self) -> bool:
        raw = self._raw
        return self._state != _OPEN or raw is None or raw.is_closing()

    def pause_reading(self) -> None:
        if self._reading_paused:
            return
        self._reading_paused = True
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.resume_reading()
        # Records that arrived with the last read may be waiting in the TLS object.
        asyncio.get_running_loop().call_soon(self._deliver)

    def is_reading(self) -> bool:
        return not self._reading_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "peercert":
            return self._sslobj.getpeercert()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    # -- inside -----------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert tells the client why
            self._fail(exc)
            return
        self._flush()  # the server's last flight and session tickets
        self._cancel_timer()
        self._state = _OPEN
        on_ready, self._on_ready = self._on_ready, None
        self._on_failed = None
        if on_ready is not None:
            on_ready(self)

    def _deliver(self) -> None:
        """Hand decrypted records to the session until none is left or it pauses."""
        app = self._app
        incoming, sslobj = self._incoming, self._sslobj
        while self._state == _OPEN and not self._reading_paused and app is not None:
            if not incoming.pending and not sslobj.pending():
                # Nothing to decrypt: skip the read and its SSLWantReadError, which
                # otherwise ends every delivery (a Python exception per command).
                break
            try:
                # With a buffer, read() returns the count (typeshed says bytes).
                count = cast(int, sslobj.read(TLS_RECORD_PLAINTEXT, _read_buffer))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                count = 0
            except ssl.SSLError as exc:
                self._flush()
                self._fatal(exc)
                return
            if count == 0:
                self._end_of_input()
                return
            app.data_received(bytes(_read_view[:count]))
        if self._state == _OPEN:
            self._flush()  # a key update's reply, say

    def _end_of_input(self) -> None:
        app = self._app
        keep_open = app.eof_received() if app is not None else None
        if not keep_open:
            self.close()

    def _flush(self) -> None:
        data = self._outgoing.read()
        raw = self._raw
        if data and raw is not None and not raw.is_closing():
            raw.write(data)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._fail(TimeoutError("TLS handshake timed out"))

    def _fail(self, exc: BaseException) -> None:
        """The handshake failed: drop the connection and say so once."""
        self._state = _FAILED
        self._cancel_timer()
        if self._raw is not None:
            self._raw.abort()
        self._report_failure(exc)

    def _report_failure(self, exc: BaseException) -> None:
        on_failed, self._on_failed = self._on_failed, None
        self._on_ready = None
        if on_failed is not None:
            on_failed(exc)

    def _fatal(self, exc: ssl.SSLError) -> None:
        """A TLS error after the handshake: the session sees the connection lost by it."""
        self._state = _CLOSED
        self._error = exc
        if self._raw is not None:
            self._raw.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
