"""validate_username: every name that could become a path trick or a log trick is refused."""

from __future__ import annotations

import unicodedata
from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.auth.names import MAX_USERNAME_LENGTH, is_valid_username, validate_username
from popbox.errors import AuthError, InvalidUsername


@pytest.mark.parametrize(
    "name",
    ["alice", "Alice", "bob.smith", "j_doe", "user-1", "a", "alice@example.org", "bob+tag", "0"],
)
def test_ordinary_names_are_accepted_unchanged(name: str) -> None:
    assert validate_username(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dotdot"),
        pytest.param("../etc", id="parent-traversal"),
        pytest.param("../../etc/passwd", id="deep-traversal"),
        pytest.param("/etc/passwd", id="absolute-path"),
        pytest.param("a/b", id="slash"),
        pytest.param("a\\b", id="backslash"),
        pytest.param(".hidden", id="hidden-file"),
        pytest.param("-rf", id="option-injection"),
        pytest.param("alice\0", id="nul-truncation"),
        pytest.param("alice:x:0:0", id="field-separator"),
        pytest.param("alice\n", id="trailing-newline"),
        pytest.param("alice\nroot:{PLAIN}x", id="line-injection"),
        pytest.param("alice\r", id="carriage-return"),
        pytest.param("al ice", id="space"),
        pytest.param("alice\t", id="tab"),
        pytest.param("\u0430lice", id="cyrillic-homoglyph"),
        pytest.param("alice\u200b", id="zero-width-space"),
        pytest.param("\uff41lice", id="fullwidth-letter"),
        pytest.param("\u0661\u0662", id="arabic-indic-digits"),
        pytest.param("alice\u202e", id="bidi-override"),
        pytest.param("*", id="wildcard"),
        pytest.param("%u", id="dovecot-variable"),
        pytest.param("$(id)", id="shell-substitution"),
    ],
)
def test_attack_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidUsername):
        validate_username(name)
    assert not is_valid_username(name)


@pytest.mark.parametrize(
    "name",
    [
        "jos\u00e9",
        "al\u0131ce",  # Turkish dotless i: a letter of the Latin script like any other
        "\u03b4\u03bf\u03ba\u03b9\u03bc\u03ae@example.gr",
        "\u5c71\u7530\u305f\u308d\u3046",  # kanji and hiragana, written together
        "\u0938\u0941\u0930\u0947\u0936",  # Devanagari with its vowel signs
        "m\u00fcller.2",
    ],
)
def test_names_in_other_scripts_are_users_too(name: str) -> None:
    assert validate_username(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("\u0430lice", id="cyrillic-a-in-latin"),
        pytest.param("jose\u0301", id="not-nfc"),
        pytest.param("\u00e9\u03b1", id="latin-and-greek"),
        pytest.param("\u05d0\u200f", id="direction-mark"),
        pytest.param("\u00e9\u00e9\u0661", id="non-ascii-digit"),
        pytest.param("\ufb01le", id="ligature"),
        pytest.param("-\u00e9", id="option"),
        pytest.param("\u00e9" * 65, id="too-many-octets"),
    ],
)
def test_international_names_that_could_fool_are_refused(name: str) -> None:
    with pytest.raises(InvalidUsername):
        validate_username(name)


def test_length_bound_is_inclusive() -> None:
    assert validate_username("a" * MAX_USERNAME_LENGTH)
    with pytest.raises(InvalidUsername):
        validate_username("a" * (MAX_USERNAME_LENGTH + 1))


def test_huge_name_is_not_echoed_whole_into_the_error() -> None:
    with pytest.raises(InvalidUsername) as caught:
        validate_username("x" * 1_000_000)
    assert len(str(caught.value)) < 200


def test_invalid_username_is_an_auth_error() -> None:
    # The glue catches AuthError at the edge; InvalidUsername must be one of them.
    assert issubclass(InvalidUsername, AuthError)


def test_names_are_case_sensitive() -> None:
    assert validate_username("Alice") != validate_username("alice")


@settings(max_examples=300, deadline=None)
# Arbitrary text, and text from a small alphabet of the characters path tricks use,
# so that accepted names are common enough to exercise the property.
@given(
    st.one_of(
        st.text(max_size=MAX_USERNAME_LENGTH + 10),
        st.text(alphabet="aZ09._-@+/\\:\0\n ", max_size=MAX_USERNAME_LENGTH + 10),
    )
)
def test_any_accepted_name_stays_one_directory_below_the_root(name: str) -> None:
    # Whatever the input, an accepted name is one plain entry inside maildir_root and
    # one field in a passwd line.
    root = PurePosixPath("/srv/mail")
    try:
        validate_username(name)
    except InvalidUsername:
        return
    assert (root / name).parent == root
    assert name not in {".", ".."}
    assert name.isascii() or unicodedata.normalize("NFC", name) == name
    assert len(name.encode()) <= MAX_USERNAME_LENGTH
    assert name.isprintable()
    assert not set(name) & set(":/\\\0\n\r \t")
