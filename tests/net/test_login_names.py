"""The login-name grammar: [recent:]MAILBOX[+FOLDER][~DEVICE][*MEMBER], each part checked
by the rule that owns it, and every name that could be a trick refused as a bad login."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popbox.config import config_from_dict
from popbox.errors import ConfigError, InvalidUsername
from popbox.net.login_names import MAX_LOGIN_NAME, LoginGrammar, LoginName
from popbox.store.mailbox import DEFAULT_DEVICE, INBOX

GRAMMAR = LoginGrammar(
    device_separator="~", folder_separator="+", master_separator="*", recent_prefix="recent:"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice", LoginName("alice", "alice")),
        ("alice~phone", LoginName("alice", "alice", device="phone")),
        ("alice~default", LoginName("alice", "alice", device=DEFAULT_DEVICE)),
        ("alice+invoices", LoginName("alice", "alice", "invoices", unsplit="alice+invoices")),
        (
            "alice+invoices~phone",
            LoginName("alice", "alice", "invoices", "phone", unsplit="alice+invoices"),
        ),
        (
            "alice+lists.python",
            LoginName("alice", "alice", "lists.python", unsplit="alice+lists.python"),
        ),
        ("alice+inbox", LoginName("alice", "alice", INBOX, unsplit="alice+inbox")),
        ("recent:alice", LoginName("alice", "alice", recent=True)),
        ("recent:alice~phone", LoginName("alice", "alice", device="phone", recent=True)),
        ("support*bob", LoginName("support", "bob", device="bob")),
        ("support~laptop*bob", LoginName("support", "bob", device="bob/laptop")),
        (
            "recent:support+tickets~laptop*bob",
            LoginName("support", "bob", "tickets", "bob/laptop", True, "support+tickets"),
        ),
        ("bob@example.org~phone", LoginName("bob@example.org", "bob@example.org", device="phone")),
    ],
)
def test_names_and_their_parts(text: str, expected: LoginName) -> None:
    # ``unsplit``: "alice+invoices" is a valid user name too, and the broker asks which.
    assert GRAMMAR.parse(text) == expected


def test_a_member_login_is_shared_and_an_own_login_is_not() -> None:
    assert GRAMMAR.parse("support*bob").shared
    assert not GRAMMAR.parse("alice~phone").shared


def test_the_unsplit_reading_is_the_user_with_the_plus_and_inbox() -> None:
    name = GRAMMAR.parse("bob+work~phone")
    assert name.as_unsplit() == LoginName("bob+work", "bob+work", INBOX, "phone")
    shared = GRAMMAR.parse("team+x*bob")
    assert shared.as_unsplit() == LoginName("team+x", "bob", INBOX, "bob")
    with pytest.raises(ValueError, match="one reading"):
        GRAMMAR.parse("alice").as_unsplit()


@pytest.mark.parametrize(
    ("text", "user"),
    [
        pytest.param("alice+", "alice+", id="empty-folder"),
        pytest.param("alice+a+b", "alice+a+b", id="folder-separator-twice"),
        pytest.param("alice+..", "alice+..", id="dotdot-folder"),
        pytest.param("alice+.hidden", "alice+.hidden", id="hidden-folder"),
        pytest.param("alice+a..b", "alice+a..b", id="empty-hierarchy-level"),
    ],
)
def test_a_plus_that_can_name_no_folder_is_part_of_the_user_name(text: str, user: str) -> None:
    # Such a name is only ever the user of that name (who is most likely unknown, so
    # the login fails like any other), never a folder outside the rules.
    assert GRAMMAR.parse(text) == LoginName(user, user)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("alice+../../etc", id="path-traversal-in-folder"),
        pytest.param("alice+/etc/passwd", id="absolute-path-in-folder"),
        pytest.param("alice+a/b", id="slash-in-folder"),
        pytest.param("alice+in\x00box", id="nul-in-folder"),
        pytest.param("alice+inbox\r\nPASS x", id="line-injection-in-folder"),
        pytest.param("alice~../../x", id="path-traversal-in-device"),
        pytest.param("alice~.", id="dot-device"),
        pytest.param("alice~-rf", id="option-injection-in-device"),
        pytest.param("alice~ph\tone", id="control-character-in-device"),
        pytest.param("alice~ph\x7fone", id="delete-character-in-device"),
        pytest.param("alice~ph\u0430ne", id="homoglyph-in-device"),
        pytest.param("alice~carol/laptop", id="device-posing-as-a-members"),
        pytest.param("alice~", id="empty-device"),
        pytest.param("~phone", id="empty-mailbox"),
        pytest.param("", id="empty-name"),
        pytest.param("recent:", id="prefix-alone"),
        pytest.param("recent:recent:alice", id="prefix-twice"),
        pytest.param("*bob", id="empty-shared-mailbox"),
        pytest.param("support*", id="empty-member"),
        pytest.param("support*../bob", id="path-traversal-in-member"),
        pytest.param("support*bob\n", id="newline-after-member"),
        pytest.param("alice~a~b", id="device-separator-twice"),
        pytest.param("support*bob*carol", id="member-separator-twice"),
        pytest.param("support*bob~x", id="device-after-member"),
        pytest.param("../alice", id="path-traversal-in-mailbox"),
        pytest.param("alice\x00~phone", id="nul-in-mailbox"),
        pytest.param("alice:x:0:0~phone", id="passwd-field-separator"),
        pytest.param("al ice", id="space"),
        pytest.param("a" * 129, id="overlong-user"),
        pytest.param("alice+" + "f" * 130, id="overlong-folder"),
        pytest.param("alice~" + "d" * 300, id="overlong-device"),
        pytest.param("alice~x" * 1000, id="overlong-name"),
    ],
)
def test_hostile_names_are_bad_logins(text: str) -> None:
    with pytest.raises(InvalidUsername):
        GRAMMAR.parse(text)


def test_an_overlong_name_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(InvalidUsername, match="too long"):
        GRAMMAR.parse("a" * (MAX_LOGIN_NAME + 1))


def test_the_error_shows_only_the_start_of_a_long_name() -> None:
    with pytest.raises(InvalidUsername) as caught:
        GRAMMAR.parse("alice~" + "x~" * 200)
    assert len(str(caught.value)) < 200


def test_turned_off_parts_are_plain_characters() -> None:
    off = LoginGrammar(
        device_separator="", folder_separator="", master_separator="", recent_prefix=""
    )
    assert off.parse("alice+invoices") == LoginName("alice+invoices", "alice+invoices")
    for text in ("alice~phone", "support*bob", "recent:alice"):
        with pytest.raises(InvalidUsername):
            off.parse(text)


@pytest.mark.parametrize(
    ("separators", "message"),
    [
        ({"device_separator": "+"}, "the device, folder and master separators must differ"),
        ({"master_separator": "~"}, "must differ"),
        ({"folder_separator": "#", "device_separator": "+"}, "mailbox.device_separator"),
        ({"master_separator": "+", "folder_separator": ""}, "mailbox.master_separator"),
        ({"recent_prefix": "r-"}, "mailbox.recent_prefix"),
        ({"recent_prefix": "recent~"}, "mailbox.recent_prefix"),
    ],
)
def test_separators_that_make_names_ambiguous_are_refused(
    separators: dict[str, str], message: str
) -> None:
    settings_ = {
        "device_separator": "~",
        "folder_separator": "+",
        "master_separator": "*",
        "recent_prefix": "recent:",
        **separators,
    }
    with pytest.raises(ValueError, match=message):
        LoginGrammar(**settings_)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_parses_into_checked_parts_or_is_a_bad_login(text: str) -> None:
    try:
        name = GRAMMAR.parse(text)
    except InvalidUsername:
        return
    for part in (name.mailbox, name.login, name.folder, name.device):
        assert part
        assert part.isascii() or unicodedata.normalize("NFC", part) == part
        assert part.isprintable()
        assert ".." not in part.split("/")
        assert not part.startswith((".", "-", "/"))


def test_check_config_refuses_ambiguous_separators_before_the_server_starts(
    tmp_path: Path,
) -> None:
    settings = {"master_separator": "+", "folder_separator": ""}
    with pytest.raises(ConfigError, match="can be part of a user name"):
        config_from_dict({"mailbox": settings}, tmp_path)
