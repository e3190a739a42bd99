"""One suite for every user database: the same passwd lines give the same logins, the
same records, the same SCRAM keys and the same refusals from the passwd file and from
PostgreSQL (filled by ``popbox user import-passwd``'s import of the same lines), and
`popbox user`'s edits (UserAdmin) count at the next login without a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import popbox.auth.checks as checks
from popbox.auth.admin import NoSuchCredential, NoSuchUser, UserExists
from popbox.auth.base import CachedUsers, PassDB, UserDirectory, UserRecord
from popbox.auth.passwdfile import PasswdFilePassDB
from popbox.auth.postgresql import PostgresPassDB
from popbox.auth.postgresql_admin import PostgresUserAdmin
from popbox.auth.schemes import cost_signature, hash_password
from popbox.auth.scram import ScramServerExchange, parse_scram_key
from popbox.auth.useradmin import PasswdFileUserAdmin, UserAdmin
from popbox.errors import AuthError
from popbox.pgsql import PoolSettings
from support.auth import CHEAP

ALICE = hash_password("alice-pw", "SHA512-CRYPT", cost=CHEAP)
BOB = hash_password("bob-pw", "SHA512-CRYPT", cost=CHEAP)


@dataclass
class Users:
    """One backend under test: ``load`` puts passwd lines in it and gives its PassDB."""

    load: Callable[[str], Awaitable[PassDB]]
    admin: UserAdmin


@pytest.fixture(params=["passwd-file", "postgresql"])
async def users(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Users]:
    passwd = tmp_path / "passwd"
    side = tmp_path / "passwd.app-passwords"
    if request.param == "passwd-file":

        async def load_file(text: str) -> PassDB:
            passwd.write_text(text)
            passwd.chmod(0o600)
            return PasswdFilePassDB(passwd, check_interval=0, credentials=side)

        yield Users(load_file, PasswdFileUserAdmin(passwd, side))
        return
    settings = PoolSettings(request.getfixturevalue("postgres_dsn"), timeout=5.0)
    admin = PostgresUserAdmin(settings)
    opened: list[PostgresPassDB] = []

    async def load_table(text: str) -> PassDB:
        passwd.write_text(text)
        await admin.import_passwd(passwd, side)
        # A fresh reading of the users' costs at every check: the suite changes them.
        db = PostgresPassDB(settings, imitation_refresh=0.0)
        opened.append(db)
        return db

    yield Users(load_table, admin)
    for db in opened:
        await db.close()
    await admin.close()


async def test_a_full_dovecot_line_gives_the_same_record(users: Users) -> None:
    db = await users.load(
        "# users\n"
        "\n"
        f"alice:{ALICE}:1000:1000:Alice A:/home/alice:/bin/false:"
        "userdb_quota_rule=*:storage=1G userdb_quota_rule2=*:messages=1000 mail=maildir:~/M "
        "popbox_login_delay=60 reason=Gone fishing, back soon\n"
        f"bob:{BOB}\n"
    )
    alice = await db.verify("alice", "alice-pw")
    assert alice == UserRecord(
        name="alice",
        quota_messages=1000,
        quota_octets=1024**3,
        extra={
            "mail": "maildir:~/M",
            "popbox_login_delay": "60",
            "reason": "Gone fishing, back soon",
        },
        home="/home/alice",
    )
    assert list(alice.extra) == ["mail", "popbox_login_delay", "reason"]  # in order
    assert await db.verify("bob", "bob-pw") == UserRecord(name="bob")
    assert await db.verify("alice", "bob-pw") is None
    assert await db.lookup("alice") == alice
    assert await db.lookup("carol") is None
    assert isinstance(db, CachedUsers)
    assert db.cached_record("alice") == alice
    assert isinstance(db, UserDirectory)
    assert sorted(record.name for record in db.users()) == ["alice", "bob"]


@pytest.mark.parametrize(
    "scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "PLAIN", "SSHA512",
               "SCRAM-SHA-256", "SCRAM-SHA-1"]
)
async def test_each_scheme_logs_in_with_its_password_only(users: Users, scheme: str) -> None:
    stored = hash_password("pässwörd 1", scheme, cost=CHEAP)
    db = await users.load(f"u:{stored}\n")
    assert await db.verify("u", "pässwörd 1") is not None
    assert await db.verify("u", "pässwörd 2") is None


async def test_unknown_names_cost_one_hash_like_a_wrong_password(
    users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await users.load(f"alice:{ALICE}\nbob:{BOB}\n")
    checked: list[str | None] = []
    real = checks.verify_password

    def recording(password: str, stored: str) -> bool:
        checked.append(cost_signature(stored))
        return real(password, stored)

    monkeypatch.setattr(checks, "verify_password", recording)
    for name in ["alice", "mallory", "../../etc/passwd", "x" * 10_000, ""]:
        assert await db.verify(name, "wrong") is None
    assert checked == ["SHA512-CRYPT rounds=1000"] * 5


async def test_users_who_cannot_log_in_stay_users_for_delivery(users: Users) -> None:
    db = await users.load(
        "nopw:\n"
        "locked:!$6$abc$def\n"
        "odd:{FOO}secret\n"
        "failing:{PLAIN}secret::::::fail\n"
        "open:{PLAIN}secret::::::nopassword\n"
    )
    for name in ["nopw", "locked", "odd", "failing", "open"]:
        assert await db.lookup(name) is not None
        for password in ["", "secret", "!$6$abc$def", "anything"]:
            assert await db.verify(name, password) is None
        assert await db.plaintext_secret(name) is None
        assert (await db.scram_credentials(name, "SCRAM-SHA-256")).problem


async def test_restricted_users_pass_verify_with_their_fields(users: Users) -> None:
    db = await users.load(
        "closed:{PLAIN}secret::::::nologin reason=Moved to the new server, see the intranet\n"
        "netlimited:{PLAIN}secret::::::allow_nets=10.0.0.0/8\n"
        "anypw:::::::allow_nets=127.0.0.0/8 nopassword\n"
    )
    closed = await db.verify("closed", "secret")
    assert closed is not None
    assert closed.extra["reason"] == "Moved to the new server, see the intranet"
    assert "nologin" in closed.extra
    netlimited = await db.verify("netlimited", "secret")
    assert netlimited is not None
    assert netlimited.extra["allow_nets"] == "10.0.0.0/8"
    anypw = await db.verify("anypw", "whatever was typed")
    assert anypw is not None
    assert await db.plaintext_secret("anypw") is None  # any password, but no APOP


async def test_scram_keys_derived_keys_and_fakes(users: Users) -> None:
    bob_key = hash_password("bob pw", "SCRAM-SHA-256", cost=CHEAP)
    db = await users.load(f"bob:{bob_key}\nalice:{{PLAIN}}alice pw\ncarol:{ALICE}\n")
    bob = await db.scram_credentials("bob", "SCRAM-SHA-256")
    assert bob == parse_scram_key(bob_key.split("}", 1)[1], "SCRAM-SHA-256")
    alice = await db.scram_credentials("alice", "SCRAM-SHA-256")
    assert not alice.problem
    assert alice == await db.scram_credentials("alice", "SCRAM-SHA-256")
    carol = await db.scram_credentials("carol", "SCRAM-SHA-256")
    assert "gives no SCRAM keys" in carol.problem
    nobody = await db.scram_credentials("nobody", "SCRAM-SHA-256")
    assert nobody.problem == "unknown user"
    assert nobody == await db.scram_credentials("nobody", "SCRAM-SHA-256")
    assert (len(nobody.salt), nobody.iterations) == (len(bob.salt), bob.iterations)
    with pytest.raises(ValueError, match="not a SCRAM hash"):
        await db.scram_credentials("bob", "SCRAM-MD5")
    # The fakes run a real exchange to its end, as a wrong password does.
    server = ScramServerExchange("SCRAM-SHA-256", {}, plus_offered=False)
    server.receive_first(b"n,,n=nobody,r=abcdefgh")
    assert isinstance(server.server_first(nobody), bytes)


async def test_app_passwords_log_in_by_label_and_revocation_counts_at_once(
    users: Users,
) -> None:
    db = await users.load(f"alice:{ALICE}\nbob:{BOB}\n")
    admin = users.admin
    phone = await admin.add_app_password("alice", "phone", scheme="SHA512-CRYPT", cost=CHEAP)
    laptop = await admin.add_app_password("alice", "laptop", scheme="SHA512-CRYPT", cost=CHEAP)
    by_phone = await db.verify("alice", phone)
    assert by_phone is not None
    assert (by_phone.name, by_phone.credential) == ("alice", "phone")
    typed = phone.replace("-", " ").upper()
    assert await db.verify("alice", typed) is not None
    assert (await db.verify("alice", "alice-pw")) == UserRecord(name="alice")
    assert await db.verify("bob", phone) is None
    assert await db.verify("nobody", phone) is None
    with pytest.raises(AuthError, match="already has"):
        await admin.add_app_password("alice", "phone", scheme="SHA512-CRYPT", cost=CHEAP)
    with pytest.raises(AuthError):
        await admin.add_app_password("alice", "a b", scheme="SHA512-CRYPT", cost=CHEAP)
    assert [app.label for app in await admin.list_app_passwords("alice")] == ["laptop", "phone"]
    await admin.revoke_app_password("alice", "phone")
    assert await db.verify("alice", phone) is None
    assert await db.verify("alice", laptop) is not None
    with pytest.raises(NoSuchCredential):
        await admin.revoke_app_password("alice", "phone")


async def test_one_hash_per_login_whatever_the_credential(
    users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await users.load(f"alice:{ALICE}\n")
    passwords = [
        await users.admin.add_app_password("alice", f"d{n}", scheme="SHA512-CRYPT", cost=CHEAP)
        for n in range(3)
    ]
    checked: list[str | None] = []
    real = checks.verify_password
    monkeypatch.setattr(
        checks, "verify_password", lambda p, s: checked.append(cost_signature(s)) or real(p, s)
    )
    for user, password in [
        ("alice", "wrong"),
        ("alice", "zzzz" * 8),
        ("mallory", passwords[1]),
        ("alice", passwords[1]),
    ]:
        before = len(checked)
        await db.verify(user, password)
        assert len(checked) == before + 1
    assert set(checked) == {"SHA512-CRYPT rounds=1000"}


async def test_apop_secret_is_its_own(users: Users) -> None:
    db = await users.load(f"alice:{ALICE}\nbob:{{PLAIN}}bob-pw\n")
    assert await db.plaintext_secret("alice") is None
    assert await db.plaintext_secret("bob") is None  # a {PLAIN} password is not one
    first = await users.admin.set_apop_secret("alice")
    assert await db.plaintext_secret("alice") == first
    assert await users.admin.set_apop_secret("alice", "chosen secret") == "chosen secret"
    assert await db.plaintext_secret("alice") == "chosen secret"
    assert await db.verify("alice", "chosen secret") is None
    assert await db.plaintext_secret("nobody") is None


async def test_edits_count_at_the_next_login_without_a_restart(users: Users) -> None:
    db = await users.load("# nobody yet\n")
    admin = users.admin
    added = await admin.add_user(
        "carol", "carol-pw", scheme="SHA512-CRYPT", cost=CHEAP, quota_octets=2**30
    )
    assert await db.verify("carol", "carol-pw") == added
    with pytest.raises(UserExists):
        await admin.add_user("carol", "x", scheme="PLAIN")
    await admin.set_password("carol", "changed", scheme="BLF-CRYPT", cost=CHEAP)
    assert await db.verify("carol", "carol-pw") is None
    assert await db.verify("carol", "changed") is not None
    await admin.set_quota("carol", 10, None)
    found = await admin.find_user("carol")
    assert found is not None
    assert (found.quota_messages, found.quota_octets) == (10, None)
    assert (await db.lookup("carol")) == found
    await admin.add_app_password("carol", "phone", scheme="SHA512-CRYPT", cost=CHEAP)
    await admin.set_apop_secret("carol")
    assert [record.name for record in await admin.list_users()] == ["carol"]
    await admin.delete_user("carol")
    assert await db.lookup("carol") is None
    assert await admin.list_app_passwords("carol") == []
    with pytest.raises(NoSuchUser):
        await admin.delete_user("carol")
    with pytest.raises(NoSuchUser):
        await admin.set_password("carol", "x", scheme="PLAIN")


async def test_a_quota_edit_keeps_the_reason_whole(users: Users) -> None:
    db = await users.load("dave:{PLAIN}pw::::::nologin reason=Moved to pop.example.net\n")
    await users.admin.set_quota("dave", None, 5 * 1024**2)
    dave = await db.lookup("dave")
    assert dave is not None
    assert dave.quota_octets == 5 * 1024**2
    assert dave.extra["reason"] == "Moved to pop.example.net"
