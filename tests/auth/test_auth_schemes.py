"""Password schemes: round trips, hashes written by Dovecot's doveadm, and bad input."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest

from popbox.auth.schemes import (
    DEFAULT_COST,
    DEFAULT_SCHEME,
    HASHABLE_SCHEMES,
    HashCost,
    cost_signature,
    hash_like,
    hash_password,
    is_plaintext,
    normalize_scheme,
    plaintext_of,
    problem_with,
    verify_password,
)

PASSWORDS = ["secret", "", "pässwörd ünïcode", "with:colon and space", "x" * 100]
SCHEMES = [*sorted(HASHABLE_SCHEMES), "SHA512.HEX", "SSHA256.HEX", "PLAIN.B64", "PLAIN.HEX"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_and_wrong_password(scheme: str, cheap: HashCost) -> None:
    for password in ["secret", "pässwörd ünïcode"]:
        stored = hash_password(password, scheme, cost=cheap)
        assert stored.startswith("{" + scheme.split(".")[0])
        assert verify_password(password, stored)
        assert not verify_password(password + "x", stored)
        assert not verify_password(password.upper(), stored)
        assert not verify_password("", stored)


@pytest.mark.parametrize("password", PASSWORDS)
def test_default_scheme_round_trip_with_default_cost(password: str) -> None:
    stored = hash_password(password)
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password(password, stored)
    assert not verify_password(password + "!", stored)


def test_default_is_argon2id() -> None:
    assert DEFAULT_SCHEME == "ARGON2ID"
    assert cost_signature(hash_password("x")) == "ARGON2ID m=19456,t=2,p=1"
    assert DEFAULT_COST.bcrypt_rounds >= 10


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("bcrypt", "BLF-CRYPT"),
        ("CLEAR", "PLAIN"),
        ("cleartext", "PLAIN"),
        ("sha1", "SHA"),
        ("argon2id", "ARGON2ID"),
        ("plain.base64", "PLAIN.B64"),
        ("sha512.hex", "SHA512.HEX"),
    ],
)
def test_aliases_normalise(alias: str, canonical: str) -> None:
    assert normalize_scheme(alias) == canonical


@pytest.mark.parametrize("scheme", ["FOO", "CRYPT", "ARGON2ID.HEX", "PLAIN.ROT13", ""])
def test_unknown_schemes_cannot_be_written(scheme: str) -> None:
    with pytest.raises(ValueError, match=r"scheme|encoding"):
        hash_password("x", scheme)


def test_bcrypt_hashes_look_like_dovecots(cheap: HashCost) -> None:
    assert hash_password("x", "BLF-CRYPT", cost=cheap).startswith("{BLF-CRYPT}$2y$04$")


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_variants_verify(prefix: str, cheap: HashCost) -> None:
    body = hash_password("secret", "BLF-CRYPT", cost=cheap).removeprefix("{BLF-CRYPT}$2y$")
    assert verify_password("secret", "{BLF-CRYPT}" + prefix + body)
    assert verify_password("secret", prefix + body)  # bare: CRYPT autodetect


def test_bcrypt_refuses_to_hash_what_it_would_truncate() -> None:
    with pytest.raises(ValueError, match="72"):
        hash_password("x" * 73, "BLF-CRYPT")


def test_bcrypt_long_password_verifies_like_dovecot(cheap: HashCost) -> None:
    # Hashes written elsewhere used the first 72 bytes; they must keep working.
    stored = hash_password("y" * 72, "BLF-CRYPT", cost=cheap)
    assert verify_password("y" * 72 + "ignored", stored)


@pytest.mark.parametrize("scheme", ["BLF-CRYPT", "SHA512-CRYPT", "MD5-CRYPT", "ARGON2ID", "PLAIN"])
def test_nul_in_password_never_matches_truncated_secret(scheme: str, cheap: HashCost) -> None:
    # C crypt() stops at NUL: "secret\0anything" must not pass as "secret".
    stored = hash_password("secret", scheme, cost=cheap)
    assert not verify_password("secret\0anything", stored)


def test_plaintext_for_apop() -> None:
    for stored in ["{PLAIN}secret", "{CLEAR}secret", "{cleartext}secret", "{PLAIN.B64}c2VjcmV0"]:
        assert is_plaintext(stored)
        assert plaintext_of(stored) == "secret"
    hashed = hash_password("secret", "SHA512-CRYPT", cost=HashCost(sha_crypt_rounds=1000))
    for stored in [hashed, "{SSHA512}abc", "", "{FOO}x", "$1$abc$def"]:
        assert not is_plaintext(stored)
        assert plaintext_of(stored) is None


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param("{FOO}secret", id="unknown-scheme"),
        pytest.param("", id="empty"),
        pytest.param("!$6$abc$def", id="locked-bang"),
        pytest.param("*", id="locked-star"),
        pytest.param("$y$j9T$salt$hash", id="yescrypt-unsupported"),
        pytest.param("secret", id="bare-plaintext-is-not-crypt"),
        pytest.param("{ARGON2ID}$2y$05$abcdefghijklmnopqrstuv", id="scheme-hash-mismatch"),
        pytest.param("{SHA512}not*base64", id="bad-base64"),
        pytest.param("{SHA512}c2VjcmV0", id="wrong-digest-length"),
        pytest.param("{BLF-CRYPT}$2y$05$short", id="truncated-bcrypt"),
        pytest.param("{ARGON2ID}$argon2id$v=19$m=x", id="truncated-argon2"),
        pytest.param("{SHA512-CRYPT}$6$", id="truncated-sha-crypt"),
        pytest.param("{PLAIN.HEX}zz", id="bad-hex"),
    ],
)
def test_unusable_stored_values_never_verify(stored: str) -> None:
    for password in ["secret", "", stored, stored.partition("}")[2]]:
        assert not verify_password(password, stored)


def test_unknown_scheme_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="popbox.auth.schemes")
    for _ in range(5):
        assert not verify_password("x", "{NEVER-SEEN-SCHEME}abc")
    assert sum("NEVER-SEEN-SCHEME" in r.getMessage() for r in caplog.records) == 1
    assert problem_with("{NEVER-SEEN-SCHEME}abc") == "unknown password scheme {NEVER-SEEN-SCHEME}"


def test_hash_like_copies_scheme_and_cost() -> None:
    dovecot_default = (
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$3hnuFIV7FWt4UWjnihGz7w$"
        "2PPaVnDQGg+Yl0P8lVZSgzPbC/Lq1y+Imi4tEao8cjc"
    )
    dummy = hash_like(
        "whatever", "{BLF-CRYPT}$2y$05$cOVb5kcVvdVoJIGyeBkQHOFpPwouQqVOXuZRxOa3si37T/SR2HZsW"
    )
    assert cost_signature(dummy) == "BLF-CRYPT rounds=5"
    assert verify_password("whatever", dummy)
    sha = hash_like(
        "w",
        "$6$pNsA3g00DIQIB2YH$bZ.ZBKNBYqbuqsAxxCXG6o1zslgrsoT4vMSI47aTCoR3Hc7UhTC1GpoxIYOObdkYfAtNz7gemQMr1EpjoW3oe.",
    )
    assert cost_signature(sha) == "SHA512-CRYPT rounds=5000"
    assert cost_signature(dovecot_default) == "ARGON2ID m=65536,t=3,p=1"
    assert cost_signature("{FOO}x") is None
    assert cost_signature(hash_like("w", "{FOO}x")) == cost_signature(hash_password("w"))


# --- hashes written by Dovecot itself -------------------------------------------------

DOVEADM = shutil.which("doveadm")
needs_doveadm = pytest.mark.skipif(DOVEADM is None, reason="doveadm (dovecot-core) not installed")

# Every scheme Dovecot writes that popbox claims to read.
DOVECOT_SCHEMES = [
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "MD5-CRYPT",
    "DES-CRYPT",
    "CRYPT",
    "PLAIN",
    "CLEAR",
    "CLEARTEXT",
    "PLAIN.B64",
    "SHA",
    "SSHA",
    "SHA256",
    "SSHA256",
    "SHA512",
    "SSHA512",
    "SHA512.HEX",
]


def doveadm_pw(scheme: str, password: str) -> str:
    assert DOVEADM is not None
    result = subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", password],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


@needs_doveadm
@pytest.mark.interop
@pytest.mark.parametrize("scheme", DOVECOT_SCHEMES)
def test_doveadm_hashes_verify(scheme: str) -> None:
    # DES-crypt only reads 8 characters, so its password is kept to 8.
    password = "s3cr3t!x" if scheme == "DES-CRYPT" else "pässwörd with spaces"
    stored = doveadm_pw(scheme, password)
    assert verify_password(password, stored), stored
    assert not verify_password("wrong", stored)
    # The same hash without its {SCHEME} prefix, as an old passwd file might hold it.
    if "CRYPT" in scheme or scheme.startswith("ARGON2"):
        bare = stored.partition("}")[2]
        assert verify_password(password, bare)


@needs_doveadm
@pytest.mark.interop
def test_dovecot_verifies_our_hashes(cheap: HashCost) -> None:
    # doveadm pw -t checks a hash against a password: what we write, Dovecot reads.
    assert DOVEADM is not None
    for scheme in [
        "ARGON2ID",
        "ARGON2I",
        "BLF-CRYPT",
        "SHA512-CRYPT",
        "SHA256-CRYPT",
        "MD5-CRYPT",
        "SSHA512",
        "SHA512",
        "PLAIN",
    ]:
        stored = hash_password("pässwörd", scheme, cost=cheap)
        result = subprocess.run(
            [DOVEADM, "pw", "-t", stored, "-p", "pässwörd"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, stored
        assert "verified" in result.stdout + result.stderr, stored


def test_oversized_password_fails_quietly(
    caplog: pytest.LogCaptureFixture, cheap: HashCost
) -> None:
    # SASL lines may be long; a huge password is the client's fault, not a bad hash.
    caplog.set_level(logging.WARNING, logger="popbox.auth.schemes")
    for scheme in ["SHA512-CRYPT", "ARGON2ID", "BLF-CRYPT", "PLAIN", "SSHA512"]:
        stored = hash_password("secret", scheme, cost=cheap)
        assert not verify_password("x" * 20_000, stored)
    assert "malformed" not in caplog.text
