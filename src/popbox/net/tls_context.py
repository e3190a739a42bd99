"""The server's TLS settings: the SSLContext both listeners use, and the embedded
default's self-signed certificate (generated with ``cryptography`` when missing).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from popbox.errors import ConfigError

__all__ = ["TLS_VERSIONS", "ensure_self_signed_cert", "make_server_context"]

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
