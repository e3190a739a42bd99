"""`popbox migrate` between Maildir and PostgreSQL while `popbox serve` runs, both ways.

A site moves its mailboxes into PostgreSQL with the server up (``storage.moving_from``)
and, to show the way back exists, moves them out again. What POP3 clients see must
not change at any point: the same UIDLs and message numbers for every device, the
deletions each device made, and mail delivered in between. A real server, a real
PostgreSQL, real POP3 and LMTP on the wire.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg

from support.serverproc import POPBOX, ServerProcess, deliver_lmtp, make_server, running

USERS = ("alice", "bob")


def storage(backend: str, moving_from: str, dsn: str) -> str:
    return (
        f'[storage]\nbackend = "{backend}"\nmoving_from = "{moving_from}"\n'
        f'[postgresql]\ndsn = "{dsn}"\nlease_seconds = 5\n'
    )


def uidls(server: ServerProcess, login: str) -> list[str]:
    client = server.pop3(login)
    try:
        return [line.decode().split()[1] for line in client.uidl()[1]]
    finally:
        client.quit()


def everything(server: ServerProcess) -> dict[str, list[str]]:
    """What each user's default device and alice's phone see."""
    seen = {user: uidls(server, user) for user in USERS}
    seen["alice~phone"] = uidls(server, "alice~phone")
    return seen


def migrate(server: ServerProcess, direction: str) -> str:
    done = subprocess.run(
        [*POPBOX, "migrate", direction, "--all", "--config", str(server.config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rows(dsn: str, user: str) -> int:
    """How many messages PostgreSQL holds for ``user``."""
    with psycopg.connect(dsn) as conn:
        made = conn.execute("SELECT to_regclass('mail_messages')").fetchone()
        if made is None or made[0] is None:
            return 0  # the store makes its tables on first use
        cursor = conn.execute(
            "SELECT count(*) FROM mail_messages m JOIN mail_folders f ON f.id = m.folder_id "
            "WHERE f.username = %s",
            (user,),
        )
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])


def test_mailboxes_move_into_postgresql_and_back_while_the_server_runs(
    tmp_path: Path, postgres_dsn: str
) -> None:
    extra = storage("postgresql", "maildir", postgres_dsn)
    server = make_server(tmp_path / "site", USERS, extra=extra)
    with running(server):
        for n in range(5):
            message = f"Subject: {n}\n\nbody\n".encode()
            assert deliver_lmtp(server.lmtp_port, "alice", message) == 250
        assert deliver_lmtp(server.lmtp_port, "bob", b"Subject: bob\n\nbody\n") == 250
        uidls(server, "alice")  # the default device holds mail from now on
        phone = server.pop3("alice~phone")
        phone.dele(1)  # the phone's own deletion; the default device keeps it
        phone.quit()
        before = everything(server)
        assert len(before["alice"]) == 5
        assert len(before["alice~phone"]) == 4
        assert rows(postgres_dsn, "alice") == 0  # still in Maildir

        report = migrate(server, "maildir-to-postgresql")
        assert report.startswith("moved 2 users, 2 folders, 6 messages"), report
        assert everything(server) == before
        assert rows(postgres_dsn, "alice") == 5
        assert not (server.maildir_root / "alice").exists()
        # New mail goes where the user now lives.
        assert deliver_lmtp(server.lmtp_port, "alice", b"Subject: after\n\nbody\n") == 250
        assert rows(postgres_dsn, "alice") == 6
        after = everything(server)
        assert after["alice"][:5] == before["alice"]
        assert len(after["alice"]) == 6

        # Running it again moves nothing and changes nothing.
        migrate(server, "maildir-to-postgresql")
        assert everything(server) == after

    server.config.write_text(
        server.config.read_text().replace(
            storage("postgresql", "maildir", postgres_dsn),
            storage("maildir", "postgresql", postgres_dsn),
        )
    )
    with running(server):
        assert everything(server) == after  # served from PostgreSQL, not moved yet
        migrate(server, "postgresql-to-maildir")
        assert everything(server) == after
        assert rows(postgres_dsn, "alice") == 0
        assert (server.maildir_root / "alice").is_dir()
        client = server.pop3("alice")
        client.dele(1)
        client.quit()
        assert uidls(server, "alice") == after["alice"][1:]
