"""App passwords and APOP secrets: the side file, its edits, and verify() over both files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import popbox.auth.checks as checks
from popbox.auth.admin import (
    NoSuchCredential,
    add_app_password,
    list_app_passwords,
    remove_credentials,
    revoke_app_password,
    set_apop_secret,
)
from popbox.auth.credentials import app_password_key, check_label, parse_credentials
from popbox.auth.passwdfile import PasswdFilePassDB
from popbox.auth.schemes import cost_signature, hash_password
from popbox.errors import AuthError, ConfigError
from support.auth import CHEAP, WritePasswd

ALICE = hash_password("alice-pw", "SHA512-CRYPT", cost=CHEAP)


@pytest.fixture
def side(tmp_path: Path) -> Path:
    return tmp_path / "passwd.app-passwords"


def open_db(passwd: Path, side: Path) -> PasswdFilePassDB:
    return PasswdFilePassDB(passwd, check_interval=0, credentials=side)


def add(side: Path, user: str, label: str) -> str:
    return add_app_password(side, user, label, scheme="SHA512-CRYPT", cost=CHEAP)


async def test_main_password_and_each_app_password_log_in_and_name_their_label(
    write_passwd: WritePasswd, side: Path
) -> None:
    db = open_db(write_passwd(f"alice:{ALICE}\n"), side)
    phone, laptop = add(side, "alice", "phone"), add(side, "alice", "laptop")
    assert phone != laptop
    own = await db.verify("alice", "alice-pw")
    assert own is not None
    assert own.credential is None
    by_phone = await db.verify("alice", phone)
    assert by_phone is not None
    assert (by_phone.name, by_phone.credential) == ("alice", "phone")
    # Typed without the dashes, or in capitals, or with spaces: the same password.
    typed = phone.replace("-", " ").upper()
    assert (await db.verify("alice", typed)) is not None
    by_laptop = await db.verify("alice", laptop)
    assert by_laptop is not None
    assert by_laptop.credential == "laptop"
    assert await db.verify("alice", phone[:-1] + ("a" if phone[-1] != "a" else "b")) is None


async def test_revocation_takes_effect_on_the_next_login_without_a_restart(
    write_passwd: WritePasswd, side: Path
) -> None:
    db = open_db(write_passwd(f"alice:{ALICE}\n"), side)
    phone, laptop = add(side, "alice", "phone"), add(side, "alice", "laptop")
    assert await db.verify("alice", phone) is not None
    revoke_app_password(side, "alice", "phone")
    assert await db.verify("alice", phone) is None
    assert await db.verify("alice", laptop) is not None
    assert await db.verify("alice", "alice-pw") is not None
    with pytest.raises(NoSuchCredential):
        revoke_app_password(side, "alice", "phone")


async def test_a_removed_side_file_takes_the_app_passwords_with_it(
    write_passwd: WritePasswd, side: Path
) -> None:
    # Unlike the passwd file (whose users stay when it vanishes), the side file only
    # adds ways in: once it is gone, so are they; the main password still works.
    db = open_db(write_passwd(f"alice:{ALICE}\n"), side)
    phone = add(side, "alice", "phone")
    assert await db.verify("alice", phone) is not None
    side.unlink()
    assert await db.verify("alice", phone) is None
    assert await db.verify("alice", "alice-pw") is not None
    laptop = add(side, "alice", "laptop")  # and a new file is read again
    assert await db.verify("alice", laptop) is not None


async def test_an_app_password_belongs_to_its_user_only(
    write_passwd: WritePasswd, side: Path
) -> None:
    db = open_db(write_passwd(f"alice:{ALICE}\nbob:{ALICE}\n"), side)
    phone = add(side, "alice", "phone")
    assert await db.verify("bob", phone) is None
    assert await db.verify("nobody", phone) is None


async def test_one_hash_per_login_whatever_the_credential(
    write_passwd: WritePasswd, side: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a timing test: every attempt checks exactly one hash, so a user with ten
    # app passwords costs what an unknown user costs.
    db = open_db(write_passwd(f"alice:{ALICE}\n"), side)
    passwords = [add(side, "alice", f"device{n}") for n in range(10)]
    checked: list[str | None] = []
    real = checks.verify_password

    def recording(password: str, stored: str) -> bool:
        checked.append(cost_signature(stored))
        return real(password, stored)

    monkeypatch.setattr(checks, "verify_password", recording)
    wrong_app = "zzzz" * 8  # an app password's shape with an id nobody has
    for user, password in [
        ("alice", "wrong"),
        ("alice", wrong_app),
        ("mallory", "wrong"),
        ("mallory", passwords[3]),
        ("alice", passwords[3]),
    ]:
        before = len(checked)
        await db.verify(user, password)
        assert len(checked) == before + 1
    assert set(checked) == {"SHA512-CRYPT rounds=1000"}


async def test_apop_secret_is_its_own_and_replaced_whole(
    write_passwd: WritePasswd, side: Path
) -> None:
    db = open_db(write_passwd(f"alice:{ALICE}\nbob:{{PLAIN}}bob-pw\n"), side)
    assert await db.plaintext_secret("alice") is None  # none yet: no APOP
    assert await db.plaintext_secret("bob") is None  # a {PLAIN} password is not one
    first = set_apop_secret(side, "alice")
    assert await db.plaintext_secret("alice") == first
    second = set_apop_secret(side, "alice", "chosen secret")
    assert second == "chosen secret" != first
    assert await db.plaintext_secret("alice") == "chosen secret"
    # The APOP secret is no password for USER/PASS.
    assert await db.verify("alice", "chosen secret") is None
    assert await db.plaintext_secret("nobody") is None


def test_side_file_is_private_and_user_del_clears_it(side: Path) -> None:
    add(side, "alice", "phone")
    set_apop_secret(side, "alice")
    add(side, "bob", "phone")
    assert os.stat(side).st_mode & 0o777 == 0o600
    assert [app.label for app in list_app_passwords(side, "alice")] == ["phone"]
    assert remove_credentials(side, "alice") == 2
    assert list_app_passwords(side, "alice") == []
    assert [app.label for app in list_app_passwords(side, "bob")] == ["phone"]
    assert "alice" not in side.read_text()


def test_labels_are_plain_and_unique(side: Path) -> None:
    add(side, "alice", "phone")
    with pytest.raises(AuthError, match="already has"):
        add(side, "alice", "phone")
    for bad in ["", "-x", "a b", "a:b", "x" * 65, "caf\u00e9"]:
        with pytest.raises(AuthError):
            add(side, "alice", bad)
    assert check_label("thunderbird-work.2") == "thunderbird-work.2"


def test_unreadable_lines_are_skipped_with_their_number(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    data = (
        "# comment\n"
        "alice:app:phone:abcdefgh:{PLAIN}x:17\n"  # 2: fine
        "alice:app:other:abcdefgh:{PLAIN}y:17\n"  # 3: id taken
        "alice:weird:x::{PLAIN}y:17\n"  # 4: kind
        "alice:apop:apop::{SHA512-CRYPT}$6$x$y:17\n"  # 5: APOP must be in the clear
        "../x:app:phone:abcdefgh:{PLAIN}x:17\n"  # 6: user
        "alice:app:phone:abcdefgh:{PLAIN}x\n"  # 7: no time
    )
    parsed = parse_credentials(data.encode(), source="side")
    assert list(parsed["alice"].apps) == ["abcdefgh"]
    messages = " ".join(record.getMessage() for record in caplog.records)
    for number in (3, 4, 5, 6, 7):
        assert f"side:{number}: skipped" in messages
    assert "side:2:" not in messages


def test_app_password_shape() -> None:
    assert app_password_key("abcd-efgh-ijkl-mnop-qrst-uvwx-yz23-4567") == (
        "abcdefgh",
        "abcdefghijklmnopqrstuvwxyz234567",
    )
    assert app_password_key("not an app password") is None
    assert app_password_key("abcd" * 7) is None  # too short
    assert app_password_key("0bcd" * 8) is None  # 0 is not in the alphabet


def test_a_side_file_others_can_write_is_refused(
    write_passwd: WritePasswd, side: Path
) -> None:
    add(side, "alice", "phone")
    side.chmod(0o620)
    with pytest.raises(ConfigError, match="app-password file is writable"):
        open_db(write_passwd(f"alice:{ALICE}\n"), side)


async def test_a_side_file_made_unsafe_later_keeps_the_old_credentials(
    write_passwd: WritePasswd, side: Path
) -> None:
    db = open_db(write_passwd(f"alice:{ALICE}\n"), side)
    phone = add(side, "alice", "phone")
    assert await db.verify("alice", phone) is not None
    side.chmod(0o666)
    laptop = add(side, "alice", "laptop")  # replaces the file (without group/other write)
    side.chmod(0o666)
    assert await db.verify("alice", phone) is not None  # the version before stays
    assert await db.verify("alice", laptop) is None
