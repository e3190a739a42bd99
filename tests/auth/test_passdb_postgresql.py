"""What only the PostgreSQL user database has: a database that can be away (the
client is told to come back, never that its password was wrong), the import of a
passwd file run again, and nodes that see each other's edits at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from popbox.auth.postgresql import PostgresPassDB
from popbox.auth.postgresql_admin import PostgresUserAdmin
from popbox.auth.schemes import hash_password
from popbox.errors import AuthError
from popbox.net.service import Pop3Service
from popbox.pgsql import PoolSettings
from popbox.store.memory import MemoryStore
from support.auth import CHEAP
from support.pop3service import Raw, make_config
from support.postgres import PostgresServer

ALICE = hash_password("alice-pw", "SHA512-CRYPT", cost=CHEAP)


async def test_a_database_away_is_sys_temp_in_a_pop3_session_and_recovers(
    private_postgres: PostgresServer,
) -> None:
    settings = PoolSettings(private_postgres.create_database(), timeout=1.0, connect_timeout=1)
    admin = PostgresUserAdmin(settings)
    await admin.add_user("alice", "alice-pw", scheme="SHA512-CRYPT", cost=CHEAP)
    await admin.close()
    passdb = PostgresPassDB(settings)
    store = MemoryStore()
    await store.deliver("alice", b"Subject: hi\n\nhello\n")
    service = Pop3Service(make_config(), store, passdb, None, {})
    await service.start()
    try:

        async def login(password: str) -> bytes:
            client = await Raw.connect(service.plain_addresses[0])
            try:
                assert (await client.line()).startswith(b"+OK")
                await client.send(f"USER alice\r\nPASS {password}\r\n".encode())
                assert (await client.line()).startswith(b"+OK")
                reply = await client.line(timeout=30)
                await client.send(b"QUIT\r\n")
                await client.line()
                return reply
            finally:
                client.close()

        assert (await login("alice-pw")).startswith(b"+OK")
        assert (await login("wrong")).startswith(b"-ERR [AUTH]")
        private_postgres.stop()
        for password in ("alice-pw", "wrong"):
            assert (await login(password)).startswith(b"-ERR [SYS/TEMP]")
        with pytest.raises(AuthError):
            await passdb.lookup("alice")
        private_postgres.start()
        for _ in range(50):  # the pool replaces its broken connections by itself
            try:
                await passdb.lookup("alice")
                break
            except AuthError:
                await asyncio.sleep(0.2)
        assert (await login("alice-pw")).startswith(b"+OK")
    finally:
        await service.shutdown()
        await passdb.close()


async def test_a_first_use_while_the_database_is_away_is_an_auth_error(
    private_postgres: PostgresServer,
) -> None:
    settings = PoolSettings(private_postgres.create_database(), timeout=1.0, connect_timeout=1)
    private_postgres.stop()
    passdb = PostgresPassDB(settings)  # builds without the database, as build_passdb does
    try:
        with pytest.raises(AuthError):
            await passdb.verify("alice", "alice-pw")
        with pytest.raises(AuthError):
            await passdb.scram_credentials("alice", "SCRAM-SHA-256")
        with pytest.raises(AuthError):
            passdb.users()
    finally:
        await passdb.close()


async def test_the_import_runs_again_and_counts_what_it_did(
    postgres_dsn: str, tmp_path: Path
) -> None:
    passwd = tmp_path / "passwd"
    side = tmp_path / "passwd.app-passwords"
    passwd.write_text(
        "# kept by hand\n"
        f"alice:{ALICE}:1000:1000:Alice:/home/alice:/bin/false:mail=maildir:~/M\n"
        "bob:{PLAIN}bob-pw\n"
        "no colon here\n"
        "alice:{PLAIN}duplicate\n"
    )
    side.write_text(
        "alice:app:phone:abcdefgh:{PLAIN}abcdefghijklmnopqrstuvwxyz234567:1767225600\n"
        "alice:apop:apop::{PLAIN}apop secret:1767225600\n"
        "ghost:apop:apop::{PLAIN}x:1767225600\n"
    )
    admin = PostgresUserAdmin(PoolSettings(postgres_dsn))
    passdb = PostgresPassDB(PoolSettings(postgres_dsn))
    try:
        first = await admin.import_passwd(passwd, side)
        assert (first.added, first.updated, first.unchanged, first.skipped) == (2, 0, 0, 2)
        assert (first.credentials_added, first.credentials_skipped) == (2, 1)
        again = await admin.import_passwd(passwd, side)
        assert (again.added, again.updated, again.unchanged) == (0, 0, 2)
        assert (again.credentials_added, again.credentials_unchanged) == (0, 2)
        assert await passdb.verify("alice", "alice-pw") is not None
        phone = await passdb.verify("alice", "abcd-efgh-ijkl-mnop-qrst-uvwx-yz23-4567")
        assert phone is not None
        assert phone.credential == "phone"
        assert await passdb.plaintext_secret("alice") == "apop secret"
        passwd.write_text("bob:{PLAIN}new-pw\ncarol:{PLAIN}carol-pw\n")
        third = await admin.import_passwd(passwd, None)
        assert (third.added, third.updated, third.unchanged) == (1, 1, 0)
        assert await passdb.verify("bob", "new-pw") is not None
        assert await passdb.verify("alice", "alice-pw") is not None  # kept
    finally:
        await admin.close()
        await passdb.close()


async def test_two_nodes_see_each_others_edits_at_the_next_login(postgres_dsn: str) -> None:
    one = PostgresPassDB(PoolSettings(postgres_dsn))
    two = PostgresPassDB(PoolSettings(postgres_dsn))
    admin = PostgresUserAdmin(PoolSettings(postgres_dsn))
    try:
        await admin.add_user("alice", "first", scheme="SHA512-CRYPT", cost=CHEAP)
        assert await one.verify("alice", "first") is not None
        assert await two.verify("alice", "first") is not None
        await admin.set_password("alice", "second", scheme="SHA512-CRYPT", cost=CHEAP)
        assert await one.verify("alice", "first") is None
        assert await two.verify("alice", "second") is not None
        await admin.delete_user("alice")
        assert await one.verify("alice", "second") is None
        assert one.cached_record("alice") is None
    finally:
        for closing in (one, two, admin):
            await closing.close()
