"""The TLS helpers (server context, generated certificate) and the listener binding."""

from __future__ import annotations

import asyncio
import ipaddress
import poplib
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from popbox.auth.memory import MemoryPassDB
from popbox.config import Config, Pop3Settings, config_from_dict
from popbox.errors import ConfigError
from popbox.net import Pop3Service, bind_sockets, ensure_self_signed_cert, make_server_context
from popbox.store.memory import MemoryStore
from support.pop3service import PASSWORD, make_config


def test_generated_certificate_names_host_and_loopback(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert ensure_self_signed_cert(cert, key, "mail.example.org") is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.org", "localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    before = cert.read_bytes()
    assert ensure_self_signed_cert(cert, key, "mail.example.org") is False
    assert cert.read_bytes() == before


def test_half_a_certificate_is_an_error_not_overwritten(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("operator's certificate")
    with pytest.raises(ConfigError, match="does not"):
        ensure_self_signed_cert(cert, key, "localhost")
    assert cert.read_text() == "operator's certificate"


def test_server_context_refuses_old_tls(tls_files: Any) -> None:
    context = make_server_context(tls_files.cert, tls_files.key, "TLSv1.2")
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    strict = make_server_context(tls_files.cert, tls_files.key, "TLSv1.3")
    assert strict.minimum_version is ssl.TLSVersion.TLSv1_3
    with pytest.raises(ConfigError, match="min_version"):
        make_server_context(tls_files.cert, tls_files.key, "TLSv1.0")


async def test_generated_certificate_is_trusted_by_pinning(tmp_path: Path) -> None:
    """The embedded default: a client that trusts the generated file verifies the server."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed_cert(cert, key, "localhost")
    store = MemoryStore()
    await store.deliver("alice", b"Subject: hi\n\nhello\n")
    service = Pop3Service(
        make_config(),
        store,
        MemoryPassDB({"alice": PASSWORD}),
        make_server_context(cert, key, "TLSv1.2"),
    )
    await service.start()
    port = service.tls_addresses[0][1]

    def fetch() -> list[bytes]:
        context = ssl.create_default_context(cafile=str(cert))
        client = poplib.POP3_SSL("localhost", port, context=context, timeout=10)
        client.user("alice")
        client.pass_(PASSWORD)
        _, lines, _ = client.retr(1)
        client.quit()
        return lines

    try:
        assert await asyncio.to_thread(fetch) == [b"Subject: hi", b"", b"hello"]
    finally:
        await service.shutdown()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_clients_are_refused(tls_files: Any) -> None:
    def old_client() -> ssl.SSLContext:
        client = ssl.create_default_context(cafile=str(tls_files.ca))
        # SECLEVEL 0 lets this OpenSSL speak TLS 1.1 at all, as an old client would.
        client.set_ciphers("DEFAULT:@SECLEVEL=0")
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
        return client

    # Control: a server that allows TLS 1.1 completes the handshake with this client,
    # so the failure below is the server's minimum version and nothing else.
    lenient = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lenient.load_cert_chain(tls_files.cert, tls_files.key)
    lenient.set_ciphers("DEFAULT:@SECLEVEL=0")
    lenient.minimum_version = ssl.TLSVersion.TLSv1
    try:
        _handshake(old_client(), lenient)
    except ssl.SSLError as exc:
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {exc}")
    with pytest.raises(ssl.SSLError):
        _handshake(old_client(), make_server_context(tls_files.cert, tls_files.key, "TLSv1.2"))


def _handshake(client_context: ssl.SSLContext, server_context: ssl.SSLContext) -> None:
    """An in-memory TLS handshake; raises SSLError when the two cannot agree."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname="localhost")
    server = server_context.wrap_bio(to_server, to_client, server_side=True)
    done = {id(client): False, id(server): False}
    for _ in range(20):
        for side in (client, server):
            if done[id(side)]:
                continue
            try:
                side.do_handshake()
                done[id(side)] = True
            except ssl.SSLWantReadError:
                pass
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_bind_sockets_ipv4_and_ipv6(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    config = Config(pop3=Pop3Settings(listen=["127.0.0.1:0", "[::1]:0"], tls_listen=["[::1]:0"]))
    try:
        plain, tls = bind_sockets(config)
    except ConfigError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert [s.family for s in plain] == [socket.AF_INET, socket.AF_INET6]
        assert [s.family for s in tls] == [socket.AF_INET6]
        for sock in plain + tls:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert sock.getsockname()[1] != 0
    finally:
        for sock in plain + tls:
            sock.close()


def test_bind_failure_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = Config(pop3=Pop3Settings(listen=[f"127.0.0.1:{port}"], tls_listen=[]))
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            bind_sockets(config)


async def test_service_serves_pre_bound_sockets_over_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    config = Config(pop3=Pop3Settings(listen=["[::1]:0"], tls_listen=[]))
    try:
        plain, tls = bind_sockets(config)
    except ConfigError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    store = MemoryStore()
    service = Pop3Service(make_config(), store, MemoryPassDB({"alice": PASSWORD}), None)
    await service.start(sockets=plain, tls_sockets=tls)
    host, port = service.plain_addresses[0]
    assert host == "::1"

    def greet() -> bytes:
        client = poplib.POP3("::1", port, timeout=10)
        welcome = client.getwelcome()
        # No TLS context: STLS is not offered; ::1 is loopback, so USER is.
        capabilities = client.capa()
        assert "STLS" not in capabilities
        assert "USER" in capabilities
        client.quit()
        return welcome

    try:
        assert (await asyncio.to_thread(greet)).startswith(b"+OK")
    finally:
        await service.shutdown()


def test_implementation_name_with_spaces_is_a_config_error(tmp_path: Path) -> None:
    """It goes on the wire in CAPA; the error must name the setting, not crash later."""
    with pytest.raises(ConfigError, match=r"pop3\.implementation"):
        config_from_dict({"pop3": {"implementation": "my server"}}, tmp_path)
