"""PasswdFilePassDB: Dovecot's passwd-file format, quotas, reloads and no user enumeration."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import popbox.auth.checks as checks
from popbox.auth.base import PassDB, UserRecord
from popbox.auth.passwdfile import PasswdFilePassDB, parse_line, parse_size, quota_from_fields
from popbox.auth.schemes import cost_signature, hash_password
from popbox.errors import ConfigError
from support.auth import CHEAP, WritePasswd

ALICE = hash_password("alice-pw", "SHA512-CRYPT", cost=CHEAP)
BOB = hash_password("bob-pw", "SHA512-CRYPT", cost=CHEAP)


def open_db(path: Path) -> PasswdFilePassDB:
    return PasswdFilePassDB(path, check_interval=0)


def test_is_a_passdb(write_passwd: WritePasswd) -> None:
    db: PassDB = open_db(write_passwd(""))
    assert db is not None


async def test_full_dovecot_line_with_quota_rules(write_passwd: WritePasswd) -> None:
    path = write_passwd(
        "# users\n"
        "\n"
        f"alice:{ALICE}:1000:1000:Alice A:/home/alice:/bin/false:"
        "userdb_quota_rule=*:storage=1G userdb_quota_rule2=*:messages=1000 mail=maildir:~/M\n"
        f"bob:{BOB}\n"
    )
    db = open_db(path)
    alice = await db.verify("alice", "alice-pw")
    assert alice == UserRecord(
        name="alice",
        quota_messages=1000,
        quota_octets=1024**3,
        extra={"mail": "maildir:~/M"},
        home="/home/alice",
    )
    assert await db.verify("bob", "bob-pw") == UserRecord(name="bob")
    assert await db.verify("alice", "bob-pw") is None
    assert await db.lookup("alice") == alice
    assert await db.lookup("carol") is None


@pytest.mark.parametrize(
    ("extra", "messages", "octets"),
    [
        ("quota_rule=*:storage=100M", None, 100 * 1024**2),
        ("userdb_quota_rule=*:storage=2048", None, 2048 * 1024),  # bare storage= is KiB
        ("userdb_quota_rule=*:bytes=12345", None, 12345),
        ("userdb_quota_rule=*:storage=512k", None, 512 * 1024),
        ("userdb_quota_rule=*:storage=10MB", None, 10 * 1024**2),
        ("userdb_quota_rule=*:storage=1T", None, 1024**4),
        ("userdb_quota_rule=*:storage=100B", None, 100),
        ("userdb_quota_rule=*:storage=1G:messages=50", 50, 1024**3),
        ("userdb_quota_rule=*:messages=0", 0, None),  # 0: no limit, overriding the default
        ("userdb_quota_rule=Trash:storage=+100M", None, None),  # other mailboxes: ignored
        ("userdb_quota_rule=*:ignore", None, None),
        ("", None, None),
    ],
)
def test_quota_rules(extra: str, messages: int | None, octets: int | None) -> None:
    entry = parse_line(f"alice:{{PLAIN}}x::::::{extra}")
    assert entry is not None
    assert (entry.record.quota_messages, entry.record.quota_octets) == (messages, octets)
    assert not entry.problems


@pytest.mark.parametrize(
    "rule", ["*:storage=+10M", "*:storage=10%", "*:storage=lots", "*:widgets=3", "*:messages=-1"]
)
def test_unusable_quota_rule_keeps_the_user_with_the_default(rule: str) -> None:
    entry = parse_line(f"alice:{{PLAIN}}x::::::userdb_quota_rule={rule}")
    assert entry is not None
    assert entry.can_login
    assert entry.record.quota_octets is None
    assert entry.record.quota_messages is None
    assert entry.problems
    with pytest.raises(ValueError, match=r"limit|size"):
        quota_from_fields({"quota_rule": rule})


def test_parse_size_for_the_cli() -> None:
    assert parse_size("500M") == 500 * 1024**2
    assert parse_size("2G") == 2 * 1024**3
    assert parse_size("1000") == 1000
    for bad in ["", "M", "1.5G", "-1", "1Q", "9" * 30]:
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


async def test_malformed_lines_are_skipped_with_line_numbers(
    write_passwd: WritePasswd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="popbox.auth.passwdfile")
    path = write_passwd(
        f"alice:{ALICE}\n"  # 1
        "no colon here\n"  # 2
        "../etc:{PLAIN}x\n"  # 3
        f"alice:{BOB}\n"  # 4: duplicate, the first line wins
        "  # indented comment\n"  # 5
        f"bob:{BOB}\n"  # 6
    )
    path.write_bytes(path.read_bytes() + b"caf\xe9:{PLAIN}x\n")  # 7: not UTF-8
    db = open_db(path)
    assert [r.name for r in db.users()] == ["alice", "bob"]
    assert await db.verify("alice", "alice-pw") is not None
    assert await db.verify("alice", "bob-pw") is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    for number in (2, 3, 4, 7):
        assert f"passwd:{number}: skipped" in messages
    assert "passwd:5:" not in messages


async def test_users_who_cannot_log_in(write_passwd: WritePasswd) -> None:
    path = write_passwd(
        "nopw:\n"
        "locked:!$6$abc$def\n"
        "odd:{FOO}secret\n"
        "failing:{PLAIN}secret::::::fail\n"
        "open:{PLAIN}secret::::::nopassword\n"  # nopassword without allow_nets
    )
    db = open_db(path)
    for name in ["nopw", "locked", "odd", "failing", "open"]:
        assert await db.lookup(name) is not None  # still a user for delivery
        for password in ["", "secret", "!$6$abc$def", "anything"]:
            assert await db.verify(name, password) is None
        assert await db.plaintext_secret(name) is None


async def test_restricted_users_pass_verify_and_carry_their_fields_to_the_broker(
    write_passwd: WritePasswd,
) -> None:
    path = write_passwd(
        "closed:{PLAIN}secret::::::nologin reason=Moved to the new server, see the intranet\n"
        "netlimited:{PLAIN}secret::::::allow_nets=10.0.0.0/8\n"
        "anypw:::::::allow_nets=127.0.0.0/8 nopassword\n"
    )
    db = open_db(path)
    closed = await db.verify("closed", "secret")
    assert closed is not None
    assert closed.extra["reason"] == "Moved to the new server, see the intranet"
    assert await db.verify("closed", "wrong") is None
    netlimited = await db.verify("netlimited", "secret")
    assert netlimited is not None
    assert netlimited.extra["allow_nets"] == "10.0.0.0/8"
    anypw = await db.verify("anypw", "whatever was typed")
    assert anypw is not None
    assert anypw.extra["allow_nets"] == "127.0.0.0/8"


async def test_a_plain_password_is_no_apop_secret(write_passwd: WritePasswd) -> None:
    path = write_passwd(f"plain:{{PLAIN}}s3cret\nhashed:{ALICE}\n")
    db = open_db(path)
    assert await db.plaintext_secret("plain") is None
    assert await db.plaintext_secret("hashed") is None
    assert await db.plaintext_secret("nobody") is None


# --- no user enumeration ---------------------------------------------------------------


async def test_unknown_user_and_wrong_password_get_the_same_reply_after_the_same_work(
    write_passwd: WritePasswd, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a timing test: we record which hash each attempt was checked against and
    # require the same scheme and cost for an unknown user as for a wrong password.
    path = write_passwd(f"alice:{ALICE}\nbob:{BOB}\n")
    db = open_db(path)
    checked: list[str | None] = []
    real = checks.verify_password

    def recording(password: str, stored: str) -> bool:
        checked.append(cost_signature(stored))
        return real(password, stored)

    monkeypatch.setattr(checks, "verify_password", recording)
    replies = [
        await db.verify("alice", "wrong"),
        await db.verify("mallory", "wrong"),
        await db.verify("../../etc/passwd", "wrong"),
        await db.verify("x" * 10_000, "wrong"),
        await db.verify("", "wrong"),
    ]
    assert replies == [None] * 5
    assert checked == ["SHA512-CRYPT rounds=1000"] * 5


async def test_dummy_follows_the_most_common_cost_in_the_file(
    write_passwd: WritePasswd, monkeypatch: pytest.MonkeyPatch
) -> None:
    bcrypt_hash = hash_password("x", "BLF-CRYPT", cost=CHEAP)
    path = write_passwd(f"a:{ALICE}\nb:{bcrypt_hash}\nc:{bcrypt_hash}\n")
    db = open_db(path)
    seen: list[str | None] = []
    real = checks.verify_password
    monkeypatch.setattr(
        checks, "verify_password", lambda p, s: seen.append(cost_signature(s)) or real(p, s)
    )
    assert await db.verify("nobody", "x") is None
    assert seen == ["BLF-CRYPT rounds=4"]


async def test_empty_file_uses_a_default_scheme_dummy(
    write_passwd: WritePasswd, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = PasswdFilePassDB(write_passwd("# nobody yet\n"), default_scheme="BLF-CRYPT")
    seen: list[str | None] = []
    real = checks.verify_password
    monkeypatch.setattr(
        checks, "verify_password", lambda p, s: seen.append(cost_signature(s)) or real(p, s)
    )
    assert await db.verify("anyone", "x") is None
    assert seen == ["BLF-CRYPT rounds=10"]


# --- reloads ---------------------------------------------------------------------------


async def test_reload_on_change(write_passwd: WritePasswd) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    db = open_db(path)
    assert await db.lookup("bob") is None
    write_passwd(f"alice:{ALICE}\nbob:{BOB}\n")
    assert await db.verify("bob", "bob-pw") is not None
    write_passwd(f"bob:{BOB}\n")
    assert await db.lookup("alice") is None


async def test_in_place_edit_is_noticed(write_passwd: WritePasswd) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    db = open_db(path)
    with path.open("a") as handle:  # same inode, new size and mtime
        handle.write(f"bob:{BOB}\n")
    assert await db.lookup("bob") is not None


async def test_reload_waits_for_the_check_interval(write_passwd: WritePasswd) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    db = PasswdFilePassDB(path, check_interval=3600)
    write_passwd(f"bob:{BOB}\n")
    assert await db.lookup("bob") is None  # not checked yet: at most one stat per interval
    db.reload()
    assert await db.lookup("bob") is not None


async def test_unsafe_new_version_keeps_old_users(
    write_passwd: WritePasswd, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    db = open_db(path)
    write_passwd(f"mallory:{{PLAIN}}x\nalice:{ALICE}\n")
    os.chmod(path, 0o666)
    assert await db.lookup("mallory") is None
    assert await db.verify("alice", "alice-pw") is not None
    assert await db.lookup("mallory") is None
    assert caplog.text.count("writable by group or others") == 1  # once per version
    os.chmod(path, 0o600)  # fixed: the new version is taken
    assert await db.lookup("mallory") is not None


async def test_vanished_file_keeps_old_users(write_passwd: WritePasswd) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    db = open_db(path)
    path.unlink()
    assert await db.verify("alice", "alice-pw") is not None


async def test_missing_file_at_start_means_no_users_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    db = open_db(path)
    assert await db.verify("alice", "alice-pw") is None
    path.write_text(f"alice:{ALICE}\n")
    path.chmod(0o600)
    assert await db.verify("alice", "alice-pw") is not None


# --- file permissions (issue 5) --------------------------------------------------------


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o660])
def test_writable_by_others_is_refused_at_start(write_passwd: WritePasswd, mode: int) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match="writable by group or others"):
        PasswdFilePassDB(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owned_by_another_user_is_refused(write_passwd: WritePasswd) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        PasswdFilePassDB(path)


def test_world_readable_is_a_warning(
    write_passwd: WritePasswd, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    os.chmod(path, 0o644)
    PasswdFilePassDB(path)
    assert "readable by everyone" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_a_config_error(write_passwd: WritePasswd) -> None:
    path = write_passwd(f"alice:{ALICE}\n")
    os.chmod(path, 0o000)
    with pytest.raises(ConfigError, match="cannot read"):
        PasswdFilePassDB(path)


async def test_hashing_runs_off_the_event_loop(
    write_passwd: WritePasswd, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = open_db(write_passwd(f"alice:{ALICE}\n"))
    threads: list[int] = []
    real = checks.verify_password

    def recording(password: str, stored: str) -> bool:
        threads.append(threading.get_ident())
        return real(password, stored)

    monkeypatch.setattr(checks, "verify_password", recording)
    assert await db.verify("alice", "alice-pw") is not None
    assert await db.verify("nobody", "x") is None
    assert len(threads) == 2
    assert threading.get_ident() not in threads


DOVEADM = shutil.which("doveadm")


@pytest.mark.interop
@pytest.mark.skipif(DOVEADM is None, reason="doveadm (dovecot-core) not installed")
async def test_a_passwd_file_written_with_doveadm_works_unchanged(
    write_passwd: WritePasswd,
) -> None:
    assert DOVEADM is not None
    schemes = ["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "PLAIN", "SSHA512"]
    lines = ["# written the way the Dovecot wiki shows"]
    for n, scheme in enumerate(schemes):
        stored = subprocess.run(
            [DOVEADM, "pw", "-s", scheme, "-p", f"pw-{n}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        lines.append(
            f"user{n}@example.org:{stored}:5000:5000::/var/vmail/user{n}::"
            f"userdb_quota_rule=*:storage={n + 1}G"
        )
    db = open_db(write_passwd("\n".join(lines) + "\n"))
    for n in range(len(schemes)):
        user = await db.verify(f"user{n}@example.org", f"pw-{n}")
        assert user is not None, schemes[n]
        assert user.quota_octets == (n + 1) * 1024**3
        assert await db.verify(f"user{n}@example.org", f"pw-{n + 1}") is None
