"""BearerVerifier against a real issuer on loopback: each test is a token an attacker
or a broken issuer could present, and what popbox must make of it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from popbox.auth.bearer import BearerSettings, BearerVerifier, TokenIdentity, TokenRefused
from popbox.errors import AuthError
from support.issuer import (
    AUDIENCE,
    INTROSPECTION_CLIENT,
    INTROSPECTION_SECRET,
    SigningKey,
    TokenIssuer,
    serve_issuer,
)


@pytest.fixture
def issuer() -> Iterator[TokenIssuer]:
    yield from serve_issuer(TokenIssuer())


def local(server: TokenIssuer, **changes: Any) -> BearerVerifier:
    settings = BearerSettings(audience=(AUDIENCE,), issuer=server.issuer)
    return BearerVerifier(replace(settings, **changes))


def introspecting(server: TokenIssuer, **changes: Any) -> BearerVerifier:
    settings = BearerSettings(
        audience=(AUDIENCE,), introspection_mode="post",
        introspection_url=server.introspection_url,
        client_id=INTROSPECTION_CLIENT, client_secret=INTROSPECTION_SECRET,
    )
    return BearerVerifier(replace(settings, **changes))


async def refused(verifier: BearerVerifier, token: str) -> str:
    result = await verifier.verify(token)
    assert isinstance(result, TokenRefused), result
    return result.reason


# -- tokens that pass ------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA", "PS256"])
async def test_a_token_signed_by_the_issuer_names_its_user(
    issuer: TokenIssuer, algorithm: str
) -> None:
    key = issuer.rotate(algorithm)
    verifier = local(issuer, algorithms=("RS256", "ES256", "EdDSA", "PS256"))
    result = await verifier.verify(issuer.token(key=key))
    assert result == TokenIdentity("alice@example.org", issuer.issuer)
    assert issuer.count("/.well-known/openid-configuration") == 1  # the keys were discovered


async def test_the_keys_are_fetched_once_for_many_logins(issuer: TokenIssuer) -> None:
    verifier = local(issuer)
    for _ in range(5):
        assert isinstance(await verifier.verify(issuer.token()), TokenIdentity)
    assert issuer.count("/certs") == 1


async def test_username_claim_and_domains_name_the_local_user(issuer: TokenIssuer) -> None:
    token = issuer.token("Alice@Example.ORG".lower())
    mapped = local(issuer, domains=("example.org",))
    assert await mapped.verify(token) == TokenIdentity("alice", issuer.issuer)
    other_domain = local(issuer, domains=("example.net",))
    assert await other_domain.verify(token) == TokenIdentity("alice@example.org", issuer.issuer)
    by_name = local(issuer, username_claim="preferred_username")
    assert await by_name.verify(token) == TokenIdentity("alice", issuer.issuer)
    assert "no upn claim" in await refused(local(issuer, username_claim="upn"), token)


async def test_metadata_is_found_by_rfc_8414_without_openid_discovery(
    issuer: TokenIssuer,
) -> None:
    issuer.discovery = False
    assert isinstance(await local(issuer).verify(issuer.token()), TokenIdentity)
    assert issuer.count("/.well-known/oauth-authorization-server/realms/mail") == 1


# -- tokens that must not pass ------------------------------------------------------


async def test_an_expired_token_is_refused(issuer: TokenIssuer) -> None:
    token = issuer.token(exp=int(issuer.claims()["iat"]) - 3600)
    assert "ExpiredSignature" in await refused(local(issuer), token)


async def test_a_future_dated_token_is_refused(issuer: TokenIssuer) -> None:
    later = int(issuer.claims()["iat"]) + 3600
    assert "ImmatureSignature" in await refused(local(issuer), issuer.token(nbf=later))
    assert "ImmatureSignature" in await refused(local(issuer), issuer.token(iat=later, nbf=None))


async def test_the_clock_skew_forgives_a_few_seconds_only(issuer: TokenIssuer) -> None:
    soon = int(issuer.claims()["iat"]) + 30
    assert isinstance(await local(issuer).verify(issuer.token(nbf=soon)), TokenIdentity)
    assert "Immature" in await refused(local(issuer, clock_skew=0), issuer.token(nbf=soon))


async def test_a_token_for_another_audience_is_refused(issuer: TokenIssuer) -> None:
    token = issuer.token(aud="https://graph.example.org")
    assert "InvalidAudience" in await refused(local(issuer), token)
    assert "aud" in await refused(local(issuer), issuer.token(aud=None))


async def test_a_token_of_another_issuer_is_refused(issuer: TokenIssuer) -> None:
    token = issuer.token(iss="https://evil.example.org/realms/mail")
    assert "InvalidIssuer" in await refused(local(issuer), token)


async def test_an_unsigned_token_is_refused(issuer: TokenIssuer) -> None:
    token = jwt.encode(issuer.claims(), None, algorithm="none")
    assert "'none' not allowed" in await refused(local(issuer), token)


async def test_an_hmac_token_keyed_with_the_public_key_is_refused(issuer: TokenIssuer) -> None:
    """The algorithm-confusion attack: HS256 with the published RSA key as the secret."""
    public = issuer.keys[-1].private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.keys[-1].kid}
    token = _hand_signed(header, issuer.claims(), public)
    assert "'HS256' not allowed" in await refused(local(issuer), token)


async def test_a_token_signed_by_another_key_under_a_published_kid_is_refused(
    issuer: TokenIssuer,
) -> None:
    forger = SigningKey.new("RS256", kid=issuer.keys[-1].kid)
    assert "InvalidSignature" in await refused(local(issuer), issuer.token(key=forger))


async def test_a_tampered_token_is_refused(issuer: TokenIssuer) -> None:
    header, _, signature = issuer.token().split(".")
    claims = issuer.claims("mallory@example.org")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert "InvalidSignature" in await refused(local(issuer), f"{header}.{body}.{signature}")


async def test_an_algorithm_not_configured_is_refused(issuer: TokenIssuer) -> None:
    key = issuer.rotate("ES256")
    assert "'ES256' not allowed" in await refused(
        local(issuer, algorithms=("RS256",)), issuer.token(key=key)
    )


async def test_a_key_of_the_wrong_type_for_the_algorithm_is_refused(issuer: TokenIssuer) -> None:
    rsa_kid = issuer.keys[-1].kid
    ec_key = SigningKey.new("ES256", kid=rsa_kid)
    assert "RSA key cannot check ES256" in await refused(
        local(issuer), issuer.token(key=ec_key)
    )


@pytest.mark.parametrize(
    "token", ["", "not a token", "a" * 20_000, "abc.def", "x\r\nRETR 1"],
    ids=["empty", "spaces", "huge", "two-parts", "injection"],
)
async def test_garbage_is_refused_without_asking_the_issuer(
    issuer: TokenIssuer, token: str
) -> None:
    await refused(local(issuer), token)
    assert issuer.count("/certs") == 0 or token == "abc.def"


# -- key rotation ---------------------------------------------------------------------


async def test_a_rotated_key_is_fetched_when_a_token_names_it(issuer: TokenIssuer) -> None:
    verifier = local(issuer)
    assert isinstance(await verifier.verify(issuer.token()), TokenIdentity)
    new_key = issuer.rotate("ES256")
    assert isinstance(await verifier.verify(issuer.token(key=new_key)), TokenIdentity)
    assert issuer.count("/certs") == 2


async def test_made_up_key_ids_refetch_the_keys_only_once(issuer: TokenIssuer) -> None:
    verifier = local(issuer)
    assert isinstance(await verifier.verify(issuer.token()), TokenIdentity)
    for number in range(5):
        forger = SigningKey.new("RS256", kid=f"made-up-{number}")
        assert "no key" in await refused(verifier, issuer.token(key=forger))
    assert issuer.count("/certs") == 2


async def test_keys_are_fetched_again_when_the_cache_runs_out(issuer: TokenIssuer) -> None:
    verifier = local(issuer, jwks_cache_seconds=1e-9)
    for _ in range(3):
        assert isinstance(await verifier.verify(issuer.token()), TokenIdentity)
    assert issuer.count("/certs") == 3


# -- an issuer that cannot be asked -----------------------------------------------------


async def test_an_issuer_that_is_down_is_a_temporary_failure(issuer: TokenIssuer) -> None:
    issuer.down = True
    with pytest.raises(AuthError, match="HTTP 503"):
        await local(issuer).verify(issuer.token())


async def test_a_jwks_url_that_is_down_is_a_temporary_failure(issuer: TokenIssuer) -> None:
    verifier = local(issuer, jwks_url=issuer.jwks_url)
    issuer.down = True
    with pytest.raises(AuthError):
        await verifier.verify(issuer.token())
    assert issuer.count("/.well-known/openid-configuration") == 0
    issuer.down = False
    assert isinstance(await verifier.verify(issuer.token()), TokenIdentity)


async def test_logins_waiting_on_a_stalled_issuer_share_one_fetch(issuer: TokenIssuer) -> None:
    """Logins that arrive while the keys are being fetched wait for that fetch; when it
    times out they all fail with it rather than each asking the issuer in turn (and
    the last waiting for every timeout before its own)."""
    verifier = local(issuer, jwks_url=issuer.jwks_url, timeout=0.3)
    issuer.stall = 1.0
    results = await asyncio.gather(
        *(verifier.verify(issuer.token()) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(result, AuthError) for result in results), results
    assert issuer.count("/certs") == 1
    issuer.stall = 0.0
    assert isinstance(await verifier.verify(issuer.token()), TokenIdentity)  # asks again


async def test_an_issuer_that_does_not_answer_in_time_is_a_temporary_failure(
    issuer: TokenIssuer,
) -> None:
    issuer.stall = 3.0
    with pytest.raises(AuthError, match="no answer within"):
        await local(issuer, timeout=0.3).verify(issuer.token())


async def test_an_endless_answer_is_cut_off(issuer: TokenIssuer) -> None:
    issuer.huge_jwks = True
    with pytest.raises(AuthError, match="answer longer than"):
        await local(issuer, jwks_url=issuer.jwks_url).verify(issuer.token())


async def test_nothing_listening_is_a_temporary_failure() -> None:
    settings = BearerSettings(
        audience=(AUDIENCE,), issuer="http://127.0.0.1:9/realms/mail", timeout=2.0
    )
    with pytest.raises(AuthError):
        await BearerVerifier(settings).verify(TokenIssuer().token())


# -- RFC 7662 introspection ------------------------------------------------------------


async def test_introspection_accepts_an_active_token(issuer: TokenIssuer) -> None:
    token = issuer.opaque_token()
    result = await introspecting(issuer).verify(token)
    assert result == TokenIdentity("alice@example.org", issuer.issuer)


async def test_introspection_refuses_an_inactive_token(issuer: TokenIssuer) -> None:
    token = issuer.opaque_token()
    issuer.revoke(token)
    assert "inactive" in await refused(introspecting(issuer), token)


async def test_introspected_claims_are_checked_too(issuer: TokenIssuer) -> None:
    verifier = introspecting(issuer, issuer=issuer.issuer)
    past = int(issuer.claims()["iat"]) - 3600
    assert "expired" in await refused(verifier, issuer.opaque_token(exp=past))
    assert "meant for" in await refused(verifier, issuer.opaque_token(aud="other"))
    assert "issued by" in await refused(verifier, issuer.opaque_token(iss="https://evil"))
    assert "not yet valid" in await refused(verifier, issuer.opaque_token(nbf=past + 7200))


async def test_introspection_with_wrong_client_credentials_is_our_fault(
    issuer: TokenIssuer,
) -> None:
    verifier = introspecting(issuer, client_secret="wrong")
    with pytest.raises(AuthError, match="HTTP 401"):
        await verifier.verify(issuer.opaque_token())


async def test_introspection_endpoint_down_is_a_temporary_failure(issuer: TokenIssuer) -> None:
    issuer.down = True
    with pytest.raises(AuthError):
        await introspecting(issuer).verify(issuer.opaque_token())


# -- settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"audience": ()}, "audience"),
        ({"algorithms": ("RS256", "HS256")}, "HS256 not allowed"),
        ({"algorithms": ("none",)}, "none not allowed"),
        ({"issuer": ""}, "issuer"),
        ({"introspection_mode": "post"}, "introspection_url"),
    ],
)
def test_settings_that_would_accept_forged_tokens_are_refused(
    changes: dict[str, Any], message: str
) -> None:
    base = {"audience": (AUDIENCE,), "issuer": "https://id.example.org"}
    with pytest.raises(ValueError, match=message):
        BearerSettings(**{**base, **changes})


def _hand_signed(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    import hashlib
    import hmac

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    signing_input = f"{part(header)}.{part(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
