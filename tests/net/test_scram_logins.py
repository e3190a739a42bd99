"""SCRAM logins on a real Pop3Service over real sockets and TLS: scramp's client and
GNU SASL's (gsasl) against stored keys, {PLAIN} passwords and hashes SCRAM cannot use;
channel binding to TLS (-PLUS) with matching and tampered data; the downgrade a
missing -PLUS would be; unknown users that look like known ones."""

from __future__ import annotations

import base64
import contextlib
import logging
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from popbox.auth.base import ScramCredentials, UserRecord
from popbox.auth.memory import MemoryPassDB
from popbox.auth.schemes import hash_password
from popbox.config import AuthSettings, Config, TlsSettings
from popbox.errors import AuthError
from popbox.net.scram import scram_mechanisms, tls_server_end_point
from popbox.net.service import Pop3Service
from popbox.store.memory import MemoryStore
from support.pop3service import PASSWORD, Raw, make_config
from support.scram import gsasl_login, scramp_login

AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"

Start = Callable[..., Awaitable[Pop3Service]]


class _UnreachablePassDB(MemoryPassDB):
    async def scram_credentials(self, username: str, hash_name: str) -> ScramCredentials:
        raise AuthError("the database is down")


@pytest.fixture
async def start(tls_files: Any, server_context: ssl.SSLContext) -> AsyncIterator[Start]:
    """A service whose users are alice ({PLAIN}), bob (a stored SCRAM-SHA-256 key),
    carol (an argon2 hash) and the mailbox support, shared with bob."""
    services: list[Pop3Service] = []

    async def start_service(
        mechanisms: list[str] | None = None, passdb_class: type[MemoryPassDB] = MemoryPassDB
    ) -> Pop3Service:
        base = make_config(auth_penalty_max=0)
        auth = AuthSettings(mechanisms=mechanisms) if mechanisms else AuthSettings()
        config = Config(
            pop3=base.pop3,
            limits=base.limits,
            tls=TlsSettings(cert=tls_files.cert, key=tls_files.key),
            auth=auth,
        )
        store = MemoryStore()
        for user in ("alice", "bob", "carol", "support"):
            await store.deliver(user, f"Subject: for {user}\n\nhello\n".encode())
        passdb = passdb_class(
            {"alice": PASSWORD},
            {"support": UserRecord("support", extra={"popbox_shared_with": "bob"})},
            stored={
                "bob": hash_password(PASSWORD, "SCRAM-SHA-256"),
                "carol": hash_password(PASSWORD, "ARGON2ID"),
                "support": hash_password("nobody knows", "SCRAM-SHA-256"),
            },
        )
        service = Pop3Service(
            config, store, passdb, server_context, scram_mechanisms(config.auth.mechanisms, passdb)
        )
        await service.start()
        services.append(service)
        return service

    yield start_service
    for client in _OPEN:
        client.close()
        with contextlib.suppress(Exception):
            await client.writer.wait_closed()
    _OPEN.clear()
    for service in services:
        await service.shutdown()


# The clients of the running test, closed before its services shut down.
_OPEN: list[Raw] = []


async def _plain(service: Pop3Service) -> Raw:
    client = await Raw.connect(service.plain_addresses[0])
    _OPEN.append(client)
    assert (await client.line()).startswith(b"+OK")
    return client


async def _tls(service: Pop3Service, ca: Any, *, tls12: bool = False) -> Raw:
    context = ssl.create_default_context(cafile=str(ca))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = await Raw.connect(service.tls_addresses[0], ssl=context, server_hostname="localhost")
    _OPEN.append(client)
    assert (await client.line()).startswith(b"+OK")
    return client


async def _capa(client: Raw) -> list[bytes]:
    await client.send(b"CAPA\r\n")
    assert (await client.line()).startswith(b"+OK")
    return (await client.multiline()).split(b"\r\n")


def _ssl_object(client: Raw) -> ssl.SSLObject:
    tls = client.writer.get_extra_info("ssl_object")
    assert isinstance(tls, ssl.SSLObject)
    return tls


async def _mailbox_subject(client: Raw) -> bytes:
    await client.send(b"TOP 1 0\r\n")
    assert (await client.line()).startswith(b"+OK")
    return (await client.multiline()).split(b"\r\n")[0]


def _end_point(client: Raw) -> bytes:
    certificate = _ssl_object(client).getpeercert(binary_form=True)
    assert certificate is not None
    data = tls_server_end_point(certificate)
    assert data is not None
    return data


# -- what is offered ------------------------------------------------------------------


async def test_plus_is_offered_inside_tls_only_and_sha1_not_by_default(
    start: Start, tls_files: Any
) -> None:
    service = await start()
    plain, tls = await _plain(service), await _tls(service, tls_files.ca)
    assert b"SASL SCRAM-SHA-256 PLAIN LOGIN" in await _capa(plain)
    assert b"SASL SCRAM-SHA-256-PLUS SCRAM-SHA-256 PLAIN LOGIN" in await _capa(tls)
    await plain.send(b"AUTH SCRAM-SHA-1\r\n")
    assert await plain.line() == b"-ERR Unsupported authentication mechanism.\r\n"


async def test_the_configured_order_is_the_order_capa_lists(start: Start, tls_files: Any) -> None:
    service = await start(["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS"])
    assert b"SASL PLAIN SCRAM-SHA-1 SCRAM-SHA-256 SCRAM-SHA-1-PLUS" in await _capa(
        await _tls(service, tls_files.ca)
    )


# -- logging in -------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "bob"], ids=["plain-password", "stored-key"])
@pytest.mark.parametrize("initial_response", [False, True], ids=["challenge", "initial"])
async def test_scram_sha_256_logs_in_and_the_server_proves_itself(
    start: Start, user: str, initial_response: bool
) -> None:
    client = await _plain(await start())
    login = await scramp_login(
        client, "SCRAM-SHA-256", user, PASSWORD, initial_response=initial_response
    )
    assert login.server_verified
    assert login.last.startswith(b"+OK Logged in")
    assert await _mailbox_subject(client) == f"Subject: for {user}".encode()


async def test_scram_sha_1_logs_in_when_enabled(start: Start) -> None:
    client = await _plain(await start(["SCRAM-SHA-1", "PLAIN"]))
    login = await scramp_login(client, "SCRAM-SHA-1", "alice", PASSWORD)
    assert login.server_verified
    assert login.last.startswith(b"+OK")


async def test_a_device_login_name_proves_its_users_password(start: Start) -> None:
    client = await _plain(await start())
    login = await scramp_login(client, "SCRAM-SHA-256", "bob~phone", PASSWORD)
    assert login.last.startswith(b"+OK Logged in")


async def test_gsasl_logs_in_and_its_authzid_opens_a_shared_mailbox(start: Start) -> None:
    if shutil.which("gsasl") is None:
        pytest.skip("gsasl is not installed (apt-get install gsasl)")
    service = await start()
    client = await _plain(service)
    replies = await gsasl_login(client, "SCRAM-SHA-256", "alice", PASSWORD)
    assert replies[-1].startswith(b"+OK Logged in"), replies
    shared = await _plain(service)
    replies = await gsasl_login(shared, "SCRAM-SHA-256", "bob", PASSWORD, authzid="support")
    assert replies[-1].startswith(b"+OK Logged in"), replies
    assert await _mailbox_subject(shared) == b"Subject: for support"
    # alice may not open it: the mailbox is shared with bob only.
    denied = await _plain(service)
    replies = await gsasl_login(denied, "SCRAM-SHA-256", "alice", PASSWORD, authzid="support")
    assert replies[-1] == AUTH_FAILED


# -- failures ----------------------------------------------------------------------------


async def test_wrong_password_unknown_user_and_unusable_hash_fail_alike(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    service = await start()
    for user, password in (("bob", "wrong"), ("nobody", PASSWORD), ("carol", PASSWORD)):
        login = await scramp_login(await _plain(service), "SCRAM-SHA-256", user, password)
        assert login.last == AUTH_FAILED
        assert len(login.replies) == 3  # the whole exchange ran, as for a known user
    log = caplog.text
    assert "unknown user" in log
    assert "stored ARGON2ID hash gives no SCRAM keys" in log
    # carol's password is right: PLAIN still works for her.
    plain = await _plain(service)
    await plain.send(b"AUTH PLAIN " + base64.b64encode(b"\0carol\0" + PASSWORD.encode()) + b"\r\n")
    assert (await plain.line()).startswith(b"+OK Logged in")


async def test_an_unknown_user_gets_a_salt_and_count_like_a_known_one(start: Start) -> None:
    service = await start()

    async def server_first(user: str) -> dict[str, str]:
        client = await _plain(service)
        first = base64.b64encode(f"n,,n={user},r=abcdefgh".encode())
        await client.send(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
        line = await client.line()
        assert line.startswith(b"+ ")
        fields = base64.b64decode(line[2:]).decode().split(",")
        return dict(field.split("=", 1) for field in fields)

    known, unknown, again = [await server_first(n) for n in ("bob", "nobody", "nobody")]
    assert unknown["s"] == again["s"]  # the same salt each time, as a stored key has
    assert len(base64.b64decode(unknown["s"])) == len(base64.b64decode(known["s"])) == 16
    assert unknown["i"] == known["i"] == "4096"


async def test_a_database_that_cannot_be_asked_is_a_temporary_failure(start: Start) -> None:
    client = await _plain(await start(passdb_class=_UnreachablePassDB))
    login = await scramp_login(client, "SCRAM-SHA-256", "alice", PASSWORD)
    assert login.last.startswith(b"-ERR [SYS/TEMP]")


async def test_anything_but_an_empty_response_after_the_signature_fails(start: Start) -> None:
    from scramp import ScramClient

    client = await _plain(await start())
    scram = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
    first = base64.b64encode(scram.get_client_first().encode())
    await client.send(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
    scram.set_server_first(base64.b64decode((await client.line())[2:]).decode())
    await client.send(base64.b64encode(scram.get_client_final().encode()) + b"\r\n")
    assert (await client.line()).startswith(b"+ ")
    await client.send(base64.b64encode(b"more") + b"\r\n")
    assert await client.line() == AUTH_FAILED


# -- channel binding -----------------------------------------------------------------------


async def test_plus_with_the_servers_certificate_logs_in(start: Start, tls_files: Any) -> None:
    client = await _tls(await start(), tls_files.ca)
    binding = ("tls-server-end-point", _ssl_object(client))
    login = await scramp_login(
        client, "SCRAM-SHA-256-PLUS", "bob", PASSWORD, channel_binding=binding
    )
    assert login.server_verified
    assert login.last.startswith(b"+OK Logged in")


async def test_plus_with_tampered_binding_data_is_refused(
    start: Start, tls_files: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose TLS ends at a man in the middle sees another certificate: the
    hash it binds differs from the server's, and the login fails."""
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    client = await _tls(await start(), tls_files.ca)
    tampered = bytes(b ^ 1 for b in _end_point(client))
    login = await scramp_login(
        client,
        "SCRAM-SHA-256-PLUS",
        "bob",
        PASSWORD,
        channel_binding=("tls-server-end-point", tampered),
    )
    assert login.last == AUTH_FAILED
    assert "e=channel-bindings-dont-match" in caplog.text


async def test_tls_unique_binds_on_tls_1_2_only(start: Start, tls_files: Any) -> None:
    service = await start()
    tls12 = await _tls(service, tls_files.ca, tls12=True)
    binding = ("tls-unique", _ssl_object(tls12))
    login = await scramp_login(
        tls12, "SCRAM-SHA-256-PLUS", "alice", PASSWORD, channel_binding=binding
    )
    assert login.last.startswith(b"+OK Logged in")
    tls13 = await _tls(service, tls_files.ca)
    assert _ssl_object(tls13).version() == "TLSv1.3"
    login = await scramp_login(
        tls13, "SCRAM-SHA-256-PLUS", "alice", PASSWORD, channel_binding=("tls-unique", b"x" * 12)
    )
    assert login.last == AUTH_FAILED


async def test_a_client_that_binds_but_saw_no_plus_is_refused_as_a_downgrade(
    start: Start, tls_files: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone stripped -PLUS from CAPA: the client, able to bind, says "y" (it thinks
    the server cannot) and the server, which can, refuses (RFC 5802 section 6)."""
    caplog.set_level(logging.INFO, logger="popbox.pop3")
    service = await start()
    tls = await _tls(service, tls_files.ca)
    binding = ("tls-server-end-point", _end_point(tls))
    login = await scramp_login(tls, "SCRAM-SHA-256", "alice", PASSWORD, channel_binding=binding)
    assert login.last == AUTH_FAILED
    assert "downgrade" in caplog.text
    # Without TLS no -PLUS is offered, so "y" is the truth there and is accepted.
    plain = await _plain(service)
    login = await scramp_login(plain, "SCRAM-SHA-256", "alice", PASSWORD, channel_binding=binding)
    assert login.last.startswith(b"+OK Logged in")


async def test_plus_without_binding_data_and_binding_without_plus_are_refused(
    start: Start, tls_files: Any
) -> None:
    service = await start()
    tls = await _tls(service, tls_files.ca)
    first = base64.b64encode(b"n,,n=alice,r=abcdefgh")
    await tls.send(b"AUTH SCRAM-SHA-256-PLUS " + first + b"\r\n")
    assert await tls.line() == AUTH_FAILED
    bound = base64.b64encode(b"p=tls-server-end-point,,n=alice,r=abcdefgh")
    await tls.send(b"AUTH SCRAM-SHA-256 " + bound + b"\r\n")
    assert await tls.line() == AUTH_FAILED


def test_auth_mechanisms_are_checked_and_named_in_upper_case(tmp_path: Any) -> None:
    from popbox.config import config_from_dict
    from popbox.errors import ConfigError

    config = config_from_dict({"auth": {"mechanisms": ["scram-sha-256", "plain"]}}, tmp_path)
    assert config.auth.mechanisms == ["SCRAM-SHA-256", "PLAIN"]
    with pytest.raises(ConfigError, match=r"auth\.mechanisms: .*unknown SASL mechanism 'CRAM-MD5'"):
        config_from_dict({"auth": {"mechanisms": ["CRAM-MD5"]}}, tmp_path)
    with pytest.raises(ConfigError, match="listed twice"):
        config_from_dict({"auth": {"mechanisms": ["PLAIN", "plain"]}}, tmp_path)
