"""OAUTHBEARER and XOAUTH2 on a real Pop3Service over TLS, tokens from a local issuer.

What a client sees on the wire: where the mechanisms are offered, the login a valid
token opens, the JSON error challenge and the dummy response before ``-ERR [AUTH]``,
and ``[SYS/TEMP]`` (no challenge) when the issuer cannot be asked.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from popbox.auth.bearer import BearerSettings, BearerVerifier
from popbox.net.bearer import bearer_factories, parse_oauthbearer, parse_xoauth2
from popbox.proto.sasl import oauthbearer_response, xoauth2_response
from support.issuer import AUDIENCE, TokenIssuer, serve_issuer
from support.pop3service import Connect, Raw, Server, StartServer

SCOPE = "openid email pop"


@pytest.fixture
def issuer() -> Iterator[TokenIssuer]:
    yield from serve_issuer(TokenIssuer())


@pytest.fixture
async def oauth_server(start_server: StartServer, issuer: TokenIssuer) -> Server:
    verifier = BearerVerifier(
        BearerSettings(
            audience=(AUDIENCE,), issuer=issuer.issuer, domains=("example.org",), scope=SCOPE
        )
    )
    return await start_server(
        plaintext_auth="never", mechanisms=bearer_factories(verifier), auth_penalty_max=0
    )


async def tls_client(connect: Connect, server: Server, context: ssl.SSLContext) -> Raw:
    client = await connect(server.tls, ssl=context, server_hostname="localhost")
    assert (await client.line()).startswith(b"+OK")
    return client


async def auth(client: Raw, mechanism: str, message: bytes) -> bytes:
    await client.send(f"AUTH {mechanism} ".encode() + base64.b64encode(message) + b"\r\n")
    return await client.line()


def error_document(line: bytes) -> dict[str, Any]:
    assert line.startswith(b"+ "), line
    document: dict[str, Any] = json.loads(base64.b64decode(line[2:].strip()))
    return document


async def capabilities(client: Raw) -> list[bytes]:
    await client.send(b"CAPA\r\n")
    assert (await client.line()).startswith(b"+OK")
    return (await client.multiline()).split(b"\r\n")


# -- what is offered where -----------------------------------------------------------


async def test_the_mechanisms_are_offered_only_where_tokens_may_be_sent(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext
) -> None:
    plain = await connect(oauth_server.plain)
    assert (await plain.line()).startswith(b"+OK")
    assert not any(line.startswith(b"SASL") for line in await capabilities(plain))
    await plain.send(b"AUTH OAUTHBEARER\r\n")
    assert (await plain.line()).startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    tls = await tls_client(connect, oauth_server, client_context)
    assert b"SASL OAUTHBEARER XOAUTH2 PLAIN LOGIN" in await capabilities(tls)


async def test_without_oauth_settings_neither_mechanism_is_offered(
    start_server: StartServer, connect: Connect, client_context: ssl.SSLContext
) -> None:
    server = await start_server(plaintext_auth="never")
    client = await tls_client(connect, server, client_context)
    assert b"SASL PLAIN LOGIN" in await capabilities(client)
    await client.send(b"AUTH XOAUTH2 dXNlcj0=\r\n")
    assert await client.line() == b"-ERR Unsupported authentication mechanism.\r\n"


# -- logins that pass ---------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
async def test_a_valid_token_opens_the_mailbox(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext,
    issuer: TokenIssuer, mechanism: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="popbox.pop3")
    client = await tls_client(connect, oauth_server, client_context)
    token = issuer.token()
    message = (
        oauthbearer_response("alice", token, "localhost", 995)
        if mechanism == "OAUTHBEARER" else xoauth2_response("alice", token)
    )
    assert (await auth(client, mechanism, message)).startswith(b"+OK Logged in, 3 messages")
    body = await client.retr(1)
    assert b"Subject: one" in body
    await client.send(b"QUIT\r\n")
    assert (await client.line()).startswith(b"+OK")
    assert any(
        f"{mechanism} token of alice from {issuer.issuer} accepted" in record.getMessage()
        for record in caplog.records
    )


async def test_oauthbearer_without_a_login_name_logs_in_as_the_token_says(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, issuer: TokenIssuer
) -> None:
    client = await tls_client(connect, oauth_server, client_context)
    message = f"n,,\x01auth=Bearer {issuer.token('bob@example.org')}\x01\x01".encode()
    assert (await auth(client, "OAUTHBEARER", message)).startswith(b"+OK Logged in, 1 messages")


async def test_a_device_login_is_proven_by_its_owners_token(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, issuer: TokenIssuer
) -> None:
    client = await tls_client(connect, oauth_server, client_context)
    message = oauthbearer_response("alice~phone", issuer.token())
    assert (await auth(client, "OAUTHBEARER", message)).startswith(b"+OK Logged in")


async def test_the_token_may_follow_an_empty_challenge(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, issuer: TokenIssuer
) -> None:
    client = await tls_client(connect, oauth_server, client_context)
    await client.send(b"AUTH XOAUTH2\r\n")
    assert await client.line() == b"+ \r\n"
    await client.send(base64.b64encode(xoauth2_response("alice", issuer.token())) + b"\r\n")
    assert (await client.line()).startswith(b"+OK Logged in")


# -- logins that fail ----------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["expired", "wrong-audience", "wrong-issuer", "alg-none", "future", "other-user"]
)
async def test_a_refused_token_gets_the_error_challenge_then_auth_failure(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext,
    issuer: TokenIssuer, case: str,
) -> None:
    import jwt

    now = int(issuer.claims()["iat"])
    token = {
        "expired": lambda: issuer.token(exp=now - 600),
        "wrong-audience": lambda: issuer.token(aud="https://outlook.office.com"),
        "wrong-issuer": lambda: issuer.token(iss="https://login.example.net/realms/mail"),
        "alg-none": lambda: jwt.encode(issuer.claims(), None, algorithm="none"),
        "future": lambda: issuer.token(nbf=now + 3600),
        "other-user": lambda: issuer.token("bob@example.org"),
    }[case]()
    client = await tls_client(connect, oauth_server, client_context)
    challenge = await auth(client, "OAUTHBEARER", oauthbearer_response("alice", token))
    assert error_document(challenge) == {
        "status": "invalid_token", "scope": SCOPE,
        "openid-configuration": f"{issuer.issuer}/.well-known/openid-configuration",
    }
    await client.send(base64.b64encode(b"\x01") + b"\r\n")  # RFC 7628's dummy response
    assert await client.line() == b"-ERR [AUTH] Authentication failed.\r\n"
    # The session goes on: a good token still logs in.
    good = oauthbearer_response("alice", issuer.token())
    assert (await auth(client, "OAUTHBEARER", good)).startswith(b"+OK Logged in")


async def test_xoauth2_refusal_is_googles_error_then_an_empty_response(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, issuer: TokenIssuer
) -> None:
    client = await tls_client(connect, oauth_server, client_context)
    token = issuer.token(exp=int(issuer.claims()["iat"]) - 600)
    challenge = await auth(client, "XOAUTH2", xoauth2_response("alice", token))
    assert error_document(challenge) == {"status": "401", "schemes": "bearer", "scope": SCOPE}
    await client.send(b"\r\n")
    assert await client.line() == b"-ERR [AUTH] Authentication failed.\r\n"


async def test_a_valid_token_of_a_user_popbox_does_not_have_is_refused(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, issuer: TokenIssuer
) -> None:
    """As a right password of a user gone since: the user lookup refuses it."""
    client = await tls_client(connect, oauth_server, client_context)
    token = issuer.token("nobody@example.org")
    reply = await auth(client, "XOAUTH2", xoauth2_response("nobody", token))
    assert reply == b"-ERR [AUTH] Authentication failed.\r\n"


@pytest.mark.parametrize(
    "message",
    [
        b"garbage",
        b"p=tls-unique,a=alice,\x01auth=Bearer abc\x01\x01",
        b"n,a=alice,\x01auth=Basic YWxpY2U6cHc=\x01\x01",
        b"n,a=alice,\x01auth=Bearer abc\x01auth=Bearer def\x01\x01",
        b"n,a=alice,\x01auth=Bearer abc\x01",
        b"n,a=al=ice,\x01auth=Bearer abc\x01\x01",
        b"n,a=alice\xff,\x01auth=Bearer abc\x01\x01",
    ],
    ids=["garbage", "channel-binding", "basic", "repeated", "unterminated", "bad-escape",
         "not-utf8"],
)
async def test_a_malformed_message_fails_at_once(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, message: bytes
) -> None:
    client = await tls_client(connect, oauth_server, client_context)
    assert await auth(client, "OAUTHBEARER", message) == b"-ERR [AUTH] Authentication failed.\r\n"


async def test_an_issuer_that_is_down_is_a_temporary_failure_without_challenge(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, issuer: TokenIssuer
) -> None:
    token = issuer.token()
    issuer.down = True
    client = await tls_client(connect, oauth_server, client_context)
    reply = await auth(client, "OAUTHBEARER", oauthbearer_response("alice", token))
    assert reply.startswith(b"-ERR [SYS/TEMP]")
    issuer.down = False
    assert (await auth(client, "OAUTHBEARER", oauthbearer_response("alice", token))).startswith(
        b"+OK Logged in"
    )


async def test_a_rotated_key_logs_in_at_once(
    oauth_server: Server, connect: Connect, client_context: ssl.SSLContext, issuer: TokenIssuer
) -> None:
    first = await tls_client(connect, oauth_server, client_context)
    assert (await auth(first, "XOAUTH2", xoauth2_response("bob", issuer.token("bob@example.org")))
            ).startswith(b"+OK")
    key = issuer.rotate("EdDSA")
    client = await tls_client(connect, oauth_server, client_context)
    message = oauthbearer_response("alice", issuer.token(key=key))
    assert (await auth(client, "OAUTHBEARER", message)).startswith(b"+OK Logged in")


# -- the parsers ------------------------------------------------------------------------


def test_the_parsers_read_what_popbox_s_own_client_sends() -> None:
    message = parse_oauthbearer(oauthbearer_response("a,b=c", "tok.en", "mail.example", 995))
    assert message is not None
    assert (message.login, message.token) == ("a,b=c", "tok.en")
    parsed = parse_xoauth2(xoauth2_response("alice~phone", "t0ken"))
    assert parsed is not None
    assert (parsed.login, parsed.token) == ("alice~phone", "t0ken")


def test_the_login_name_is_read_in_nfc_as_user_reads_it() -> None:
    decomposed = "jose\u0301"
    message = parse_xoauth2(xoauth2_response(decomposed, "t0ken"))
    assert message is not None
    assert message.login == "jos\u00e9"


@pytest.mark.parametrize(
    "message",
    [b"", b"\x01", b"user=alice\x01\x01", b"auth=Bearer x\x01\x01",
     b"user=\x01auth=Bearer x\x01\x01", b"user=a\x01auth=Bearer x\x01extra=1\x01\x01",
     b"user=a\x01auth=Bearer x y\x01\x01", b"user=a\x01auth=Bearer x\x01",
     b"user=a\x00b\x01auth=Bearer x\x01\x01"],
)
def test_xoauth2_parser_refuses_what_is_not_googles_form(message: bytes) -> None:
    assert parse_xoauth2(message) is None


def test_oauthbearer_parser_bounds_the_pairs() -> None:
    pairs = "".join(f"k{chr(97 + n % 26)}{chr(97 + n // 26)}=v\x01" for n in range(40))
    assert parse_oauthbearer(f"n,,\x01auth=Bearer x\x01{pairs}\x01".encode()) is None


async def test_cancelling_after_the_error_challenge_still_counts_the_guess(
    start_server: StartServer, issuer: TokenIssuer, connect: Connect,
    client_context: ssl.SSLContext,
) -> None:
    # The error challenge already says "refused": a client that answers it with "*"
    # rather than the dummy response is penalised all the same.
    verifier = BearerVerifier(BearerSettings(audience=(AUDIENCE,), issuer=issuer.issuer))
    server = await start_server(plaintext_auth="never", mechanisms=bearer_factories(verifier))
    client = await tls_client(connect, server, client_context)
    expired = issuer.token(exp=int(issuer.claims()["iat"]) - 600)
    error_document(await auth(client, "OAUTHBEARER", oauthbearer_response("alice", expired)))
    await client.send(b"*\r\n")
    assert await client.line() == b"-ERR Authentication cancelled.\r\n"
    hub = server.service._hub
    assert hub is not None
    assert hub.penalty.delay("127.0.0.1") > 0
