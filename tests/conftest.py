"""Fixtures shared by several test areas: a test CA and certificate, shared dirs,
Dovecot, and the session's PostgreSQL server with a database per test."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from popbox.net.tls_context import make_server_context
from support.dovecot import DovecotServer, start_dovecot
from support.postgres import PostgresServer, postgres_skip_reason, start_postgres


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a certificate for localhost/127.0.0.1/::1 it signed, as PEM files."""

    ca: Path
    cert: Path
    key: Path
    authority: trustme.CA


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    # A subject CN as well as the SANs: fetchmail refuses certificates without one.
    server = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost")
    ca_path = directory / "ca.pem"
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    server.private_key_pem.write_to_path(str(key_path))
    return TlsFiles(ca=ca_path, cert=cert_path, key=key_path, authority=ca)


@pytest.fixture
def server_context(tls_files: TlsFiles) -> ssl.SSLContext:
    """popbox's server-side TLS context for the shared certificate."""
    return make_server_context(tls_files.cert, tls_files.key, "TLSv1.2")


@pytest.fixture
def client_context(tls_files: TlsFiles) -> ssl.SSLContext:
    """A client context that trusts the test CA and checks the host name."""
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    assert context.check_hostname
    return context


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory that other system users can traverse (mode 0711).

    Real servers drop to their own users (Dovecot's mail and dovenull, getmail's
    refusal to run as root), and pytest keeps its tmp tree at 0700 (concurrent runs
    reset it to that at any moment), so their files live here instead.
    """
    root = Path(tempfile.mkdtemp(prefix="popbox-test-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot(tls_files: TlsFiles, shared_tmp: Path) -> Iterator[DovecotServer]:
    """A private Dovecot with user alice (password "secret") and an empty Maildir."""
    server = start_dovecot(shared_tmp / "dovecot", tls_files.cert, tls_files.key)
    server.add_user("alice", "secret")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the whole session, started on first use."""
    reason = postgres_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="popbox-pg-"))
    root.chmod(0o711)
    server = start_postgres(root / "cluster")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A new, empty database of the session's PostgreSQL, for this test alone."""
    return postgres_server.create_database()


@pytest.fixture
def private_postgres(shared_tmp: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may stop, crash and restart."""
    reason = postgres_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = start_postgres(shared_tmp / "postgres")
    try:
        yield server
    finally:
        server.stop("immediate")
