"""SASL mechanisms as pure state machines, and strict base64 (RFC 4616, 5034)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.proto.sasl import (
    Challenge,
    Credentials,
    LoginMechanism,
    PlainMechanism,
    SaslFailure,
    decode_response,
    new_mechanism,
)


@pytest.mark.parametrize(
    ("message", "step"),
    [
        (b"\0tim\0tanstaaftanstaaf", Credentials("tim", "tanstaaftanstaaf")),  # RFC 4616 s4
        (b"tim\0tim\0pw", Credentials("tim", "pw")),
        (b"Kurt\0tim\0pw", SaslFailure("Authorization identity must be the user")),
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
