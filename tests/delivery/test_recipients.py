"""Recipient to user mapping: domains, delimiters, case, quoting, and names refused."""

from __future__ import annotations

import pytest

from popbox.config import LmtpSettings
from popbox.delivery.recipients import parse_recipient, split_address
from popbox.errors import InvalidUsername, UnknownRecipient

ANY_DOMAIN = LmtpSettings()
OURS = LmtpSettings(domains=["example.test", "Other.Example"])


@pytest.mark.parametrize(
    ("address", "user", "detail"),
    [
        ("alice", "alice", ""),
        ("alice@example.test", "alice", ""),
        ("<alice@example.test>", "alice", ""),
        ("ALICE@EXAMPLE.TEST", "alice", ""),
        ("alice+lists@example.test", "alice", "lists"),
        ("alice+a+b@example.test", "alice", "a+b"),
        ('"alice"@example.test', "alice", ""),
        ('"al\\ice"@example.test', "alice", ""),
        ("<@relay.example:alice@example.test>", "alice", ""),
        ("alice@other.example", "alice", ""),
        ("alice@example.test.", "alice", ""),
    ],
)
def test_addresses_that_map_to_a_user(address: str, user: str, detail: str) -> None:
    recipient = parse_recipient(address, OURS)
    assert (recipient.user, recipient.detail) == (user, detail)
    assert recipient.address == address


def test_without_configured_domains_every_domain_is_accepted() -> None:
    # Like Dovecot: the MTA already chose which domains to hand us.
    assert parse_recipient("alice@anything.example", ANY_DOMAIN).user == "alice"


def test_domain_not_ours_is_unknown() -> None:
    with pytest.raises(UnknownRecipient):
        parse_recipient("alice@elsewhere.example", OURS)


def test_case_is_kept_when_configured() -> None:
    settings = LmtpSettings(lowercase_local_part=False)
    assert parse_recipient("Alice@example.test", settings).user == "Alice"


def test_several_delimiters_and_none() -> None:
    several = LmtpSettings(recipient_delimiter="+-")
    assert parse_recipient("alice-news@x", several).user == "alice"
    assert parse_recipient("alice+news@x", several).user == "alice"
    off = LmtpSettings(recipient_delimiter="")
    assert parse_recipient("alice+news@x", off).user == "alice+news"


def test_leading_delimiter_keeps_the_local_part_whole() -> None:
    # "+tag" would map to the empty name; the whole local part is tried instead.
    assert parse_recipient("+tag@example.test", ANY_DOMAIN).user == "+tag"


@pytest.mark.parametrize(
    "address",
    [
        "../etc@example.test",
        "a/b@example.test",
        '"a b"@example.test',
        '"a:b"@example.test',
        ".hidden@example.test",
        "@example.test",
        '"x\\\n"@example.test',
    ],
)
def test_names_that_can_never_be_users_are_refused(address: str) -> None:
    with pytest.raises((InvalidUsername, UnknownRecipient)):
        parse_recipient(address, ANY_DOMAIN)


@pytest.mark.parametrize("address", ['"unterminated@example.test', '"a"b@example.test'])
def test_malformed_quoting_is_refused(address: str) -> None:
    with pytest.raises(UnknownRecipient):
        split_address(address)


def test_overlong_address_is_refused() -> None:
    with pytest.raises(UnknownRecipient):
        parse_recipient("a" * 300 + "@example.test", ANY_DOMAIN)
