"""Passwd-file editing for `popbox user`: atomic, serialised, and keeping everything else."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from popbox.auth.admin import (
    NoSuchUser,
    UserExists,
    add_user,
    delete_user,
    format_size,
    list_users,
    set_password,
    set_quota,
)
from popbox.auth.base import UserRecord
from popbox.auth.passwdfile import PasswdFilePassDB
from popbox.errors import AuthError, InvalidUsername
from support.auth import CHEAP

EXISTING = (
    "# Dovecot users, kept by hand\n"
    "\n"
    "carol:{PLAIN}carol-pw:1000:1000:Carol C:/home/carol:/bin/false:mail=maildir:~/Mail x\n"
    "  # an indented comment\n"
    "dave:{PLAIN}dave-pw::::::userdb_quota_rule=*:storage=1G "
    "userdb_quota_rule2=Trash:storage=+100M\n"
)


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text(EXISTING)
    path.chmod(0o600)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_creates_private_file_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "data" / "passwd"
    record = add_user(path, "alice", "pw", cost=CHEAP, quota_messages=10, quota_octets=2**30)
    assert record == UserRecord(name="alice", quota_messages=10, quota_octets=2**30)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert list_users(path) == [record]
    assert path.read_text().startswith("alice:{ARGON2ID}$argon2id$")


async def test_added_user_can_log_in_through_the_passdb(passwd: Path) -> None:
    db = PasswdFilePassDB(passwd, check_interval=0)
    add_user(passwd, "alice", "alice-pw", scheme="SHA512-CRYPT", cost=CHEAP)
    assert await db.verify("alice", "alice-pw") == UserRecord(name="alice")
    set_password(passwd, "alice", "changed", scheme="BLF-CRYPT", cost=CHEAP)
    assert await db.verify("alice", "alice-pw") is None
    assert await db.verify("alice", "changed") is not None
    delete_user(passwd, "alice")
    assert await db.lookup("alice") is None


def test_edits_keep_comments_other_lines_and_extra_fields(passwd: Path) -> None:
    add_user(passwd, "alice", "pw", scheme="PLAIN")
    set_password(passwd, "carol", "new", scheme="PLAIN")
    delete_user(passwd, "alice")
    assert passwd.read_text() == EXISTING.replace("{PLAIN}carol-pw", "{PLAIN}new")


def test_add_existing_user_is_refused(passwd: Path) -> None:
    before = passwd.read_bytes()
    with pytest.raises(UserExists, match="carol"):
        add_user(passwd, "carol", "pw", scheme="PLAIN")
    assert passwd.read_bytes() == before


def test_absent_users_are_errors(passwd: Path) -> None:
    for edit in (
        lambda: set_password(passwd, "nobody", "pw", scheme="PLAIN"),
        lambda: delete_user(passwd, "nobody"),
        lambda: set_quota(passwd, "nobody", 1, 1),
    ):
        with pytest.raises(NoSuchUser, match="nobody"):
            edit()
    # A commented-out user is not a user.
    passwd.write_text("#erin:{PLAIN}x\n")
    with pytest.raises(NoSuchUser):
        delete_user(passwd, "erin")


@pytest.mark.parametrize("name", ["../etc/passwd", "a:b", "x\nroot", "", ".hidden"])
def test_invalid_names_never_reach_the_file(passwd: Path, name: str) -> None:
    before = passwd.read_bytes()
    with pytest.raises(InvalidUsername):
        add_user(passwd, name, "pw", scheme="PLAIN")
    assert passwd.read_bytes() == before


@pytest.mark.parametrize("password", ["a:b", "line\nbreak", "nul\0", "cr\r"])
def test_plain_password_that_would_break_the_line_is_refused(passwd: Path, password: str) -> None:
    with pytest.raises(AuthError, match=r"PLAIN\.B64"):
        add_user(passwd, "alice", password, scheme="PLAIN")
    add_user(passwd, "alice", password, scheme="PLAIN.B64")
    assert [u.name for u in list_users(passwd)] == ["carol", "dave", "alice"]


def test_unknown_scheme_is_an_auth_error(passwd: Path) -> None:
    with pytest.raises(AuthError, match="scheme"):
        add_user(passwd, "alice", "pw", scheme="ROT13")


def test_set_quota_replaces_only_the_star_rules(passwd: Path) -> None:
    set_quota(passwd, "dave", 500, 100 * 1024**2)
    line = passwd.read_text().splitlines()[4]
    assert "userdb_quota_rule2=Trash:storage=+100M" in line
    assert "*:storage=1G" not in line
    dave = next(u for u in list_users(passwd) if u.name == "dave")
    assert (dave.quota_messages, dave.quota_octets) == (500, 100 * 1024**2)
    set_quota(passwd, "dave", None, None)  # back to the configured default
    dave = next(u for u in list_users(passwd) if u.name == "dave")
    assert (dave.quota_messages, dave.quota_octets) == (None, None)
    set_quota(passwd, "carol", 0, 0)  # 0: explicitly no limit
    carol = next(u for u in list_users(passwd) if u.name == "carol")
    assert (carol.quota_messages, carol.quota_octets) == (0, 0)
    assert carol.extra == {"mail": "maildir:~/Mail", "x": ""}
    with pytest.raises(AuthError, match="negative"):
        set_quota(passwd, "carol", -1, None)


@pytest.mark.parametrize(
    ("octets", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1024, "1k"),
        (1536, "1536B"),
        (5 * 1024**2, "5M"),
        (2**30, "1G"),
        (3 * 1024**4, "3T"),
    ],
)
def test_sizes_are_written_in_dovecot_units(octets: int, text: str) -> None:
    assert format_size(octets) == text


def test_edit_keeps_mode_but_drops_group_and_world_write(passwd: Path) -> None:
    passwd.chmod(0o640)
    add_user(passwd, "alice", "pw", scheme="PLAIN")
    assert mode(passwd) == 0o640
    passwd.chmod(0o666)
    delete_user(passwd, "alice")
    assert mode(passwd) == 0o644


def test_edit_through_a_symlink_keeps_the_symlink(passwd: Path, tmp_path: Path) -> None:
    link = tmp_path / "users"
    link.symlink_to(passwd)
    add_user(link, "alice", "pw", scheme="PLAIN")
    assert link.is_symlink()
    assert "alice" in [u.name for u in list_users(passwd)]


def test_no_temporary_files_left_behind(passwd: Path) -> None:
    add_user(passwd, "alice", "pw", scheme="PLAIN")
    with pytest.raises(UserExists):
        add_user(passwd, "alice", "pw", scheme="PLAIN")
    assert sorted(p.name for p in passwd.parent.iterdir()) == ["passwd", "passwd.lock"]


def test_list_users_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert list_users(tmp_path / "nothing") == []


# Each worker adds its own users one by one, as concurrent `popbox user add` would.
WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from popbox.auth.admin import add_user
    path, worker, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for n in range(count):
        add_user(path, f"w{worker}-{n}", "pw", scheme="PLAIN")
    """
)


def test_concurrent_adds_from_several_processes_lose_nothing(passwd: Path) -> None:
    workers, per_worker = 4, 15
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(passwd), str(w), str(per_worker)])
        for w in range(workers)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    names = [u.name for u in list_users(passwd)]
    expected = {f"w{w}-{n}" for w in range(workers) for n in range(per_worker)}
    assert expected <= set(names)
    assert len(names) == len(set(names)) == workers * per_worker + 2
    assert passwd.read_text().startswith(EXISTING)
    assert sorted(os.listdir(passwd.parent)) == ["passwd", "passwd.lock"]
