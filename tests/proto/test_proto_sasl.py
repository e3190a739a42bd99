"""SASL for both sides: the server's mechanisms as pure state machines, strict base64
(RFC 4616, 5034), the client's responses and the APOP digest (RFC 1939)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.proto.sasl import (
    Challenge,
    Credentials,
    LoginMechanism,
    PlainMechanism,
    SaslFailure,
    apop_digest,
    decode_challenge,
    decode_response,
    login_responses,
    new_mechanism,
    oauthbearer_response,
    plain_response,
    xoauth2_response,
)


@pytest.mark.parametrize(
    ("message", "step"),
    [
        (b"\0tim\0tanstaaftanstaaf", Credentials("tim", "tanstaaftanstaaf")),  # RFC 4616 s4
        (b"tim\0tim\0pw", Credentials("tim", "pw")),
        (b"Kurt\0tim\0pw", Credentials("tim", "pw", "Kurt")),  # RFC 4616 section 4
        (b"Ku\nrt\0tim\0pw", SaslFailure("Invalid authorization identity")),
        (b"\0tim\0", SaslFailure("Invalid user name or empty password")),
        (b"\0\0pw", SaslFailure("Invalid user name or empty password")),
        (b"\0t\nim\0pw", SaslFailure("Invalid user name or empty password")),
        (b"\0tim\0p\0w", SaslFailure("Invalid PLAIN message")),
        (b"tim pw", SaslFailure("Invalid PLAIN message")),
        (b"\0t\xc3\0pw", SaslFailure("Invalid UTF-8 in PLAIN message")),
        (b"\0j\xc3\xbcrgen\0p\xc3\xa4ss", Credentials("j\u00fcrgen", "p\u00e4ss")),
    ],
)
def test_plain(message: bytes, step: object) -> None:
    assert PlainMechanism().start(message) == step
    mechanism = PlainMechanism()
    assert mechanism.start(None) == Challenge(b"")
    assert mechanism.respond(message) == step


def test_login_exchange() -> None:
    mechanism = LoginMechanism()
    assert mechanism.start(None) == Challenge(b"Username:")
    assert mechanism.respond(b"tim") == Challenge(b"Password:")
    assert mechanism.respond(b"secret pw") == Credentials("tim", "secret pw")


def test_login_rejects_empty_password_and_bad_utf8() -> None:
    mechanism = LoginMechanism()
    assert mechanism.start(b"tim") == Challenge(b"Password:")
    assert mechanism.respond(b"") == SaslFailure("Empty password")
    assert LoginMechanism().start(b"\xff") == SaslFailure("Invalid UTF-8 in LOGIN response")


def test_only_plain_and_login_are_offered() -> None:
    assert isinstance(new_mechanism("PLAIN"), PlainMechanism)
    assert isinstance(new_mechanism("LOGIN"), LoginMechanism)
    assert new_mechanism("CRAM-MD5") is None
    assert new_mechanism("plain") is None  # callers upper-case first


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b"", b""),
        (b"dGlt", b"tim"),
        (b"dGk=", b"ti"),
        (b"dA==", b"t"),
        (b"dA", None),
        (b"dA=", None),
        (b"dA===", None),
        (b"dA==dA==", None),
        (b"d A==", None),
        (b"dGl0\n", None),
        (b"*", None),
        (b"dGl_", None),
    ],
)
def test_strict_base64(line: bytes, data: bytes | None) -> None:
    assert decode_response(line) == data


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_mechanisms_never_raise(data: bytes) -> None:
    for name in ("PLAIN", "LOGIN"):
        mechanism = new_mechanism(name)
        assert mechanism is not None
        step = mechanism.start(data)
        while isinstance(step, Challenge):
            step = mechanism.respond(data)
        assert isinstance(step, Credentials | SaslFailure)
    assert decode_response(data) is None or isinstance(decode_response(data), bytes)


# -- the client's side


def test_apop_digest_matches_rfc1939_example() -> None:
    assert (
        apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
        == "c4c9334bac560ecc979e58001b3e22fb"
    )


def test_oauthbearer_gs2_header() -> None:
    assert oauthbearer_response("a,b=c", "TOK") == b"n,a=a=2Cb=3Dc,\x01auth=Bearer TOK\x01\x01"
    assert (
        oauthbearer_response("u", "T", "mail.example", 995)
        == b"n,a=u,\x01host=mail.example\x01port=995\x01auth=Bearer T\x01\x01"
    )


def test_xoauth2_response() -> None:
    assert xoauth2_response("u@example.com", "T") == b"user=u@example.com\x01auth=Bearer T\x01\x01"


# Names and passwords as accounts hold them: any printable text, 8-bit included.
CREDENTIAL = st.text(
    st.characters(min_codepoint=0x20, blacklist_categories=["Cc", "Cs"]), min_size=1
)


@settings(max_examples=100)
@given(CREDENTIAL, CREDENTIAL)
def test_client_plain_and_login_answer_the_server_mechanisms(username: str, password: str) -> None:
    # What the collector sends is what popbox's own server takes apart; the name as
    # the server compares names, in NFC (RFC 6856), the password as it was.
    sent, username = username, unicodedata.normalize("NFC", username)
    assert PlainMechanism().start(plain_response(sent, password)) == Credentials(
        username, password
    )
    login = LoginMechanism()
    first, second = login_responses(sent, password)
    assert login.start(None) == Challenge(b"Username:")
    assert login.respond(first) == Challenge(b"Password:")
    assert login.respond(second) == Credentials(username, password)


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("", b""),
        ("VXNlcm5hbWU6", b"Username:"),
        ("eyJzdGF0dXMiOiI0MDEifQ==", b'{"status":"401"}'),
        ("not base64!", None),
        ("YQ", None),
    ],
)
def test_decode_challenge(text: str, data: bytes | None) -> None:
    assert decode_challenge(text) == data
