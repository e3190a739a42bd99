"""`popbox user`, every subcommand, on each user database: run as an administrator
would (click's runner on a config file), then checked through the server's own PassDB
(popbox.backends.build_passdb), so what the command wrote is what a login reads."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from popbox.auth.base import ClosingPassDB, UserRecord
from popbox.backends import build_passdb
from popbox.cli import main
from popbox.cli_support import CONFIG_ENV
from popbox.config import Config, load_config


@dataclass
class Site:
    config_path: Path
    config: Config
    tmp: Path

    def run(self, *args: str, stdin: str | None = None) -> Result:
        env = {CONFIG_ENV: str(self.config_path)}
        return CliRunner().invoke(main, list(args), input=stdin, env=env)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.exit_code == 0, result.output
        return result.output

    def verify(self, name: str, password: str) -> UserRecord | None:
        async def check() -> UserRecord | None:
            passdb = build_passdb(self.config)
            try:
                return await passdb.verify(name, password)
            finally:
                if isinstance(passdb, ClosingPassDB):
                    await passdb.close()

        return asyncio.run(check())

    def apop(self, name: str) -> str | None:
        async def secret() -> str | None:
            passdb = build_passdb(self.config)
            try:
                return await passdb.plaintext_secret(name)
            finally:
                if isinstance(passdb, ClosingPassDB):
                    await passdb.close()

        return asyncio.run(secret())


def _site(tmp_path: Path, auth: str) -> Site:
    path = tmp_path / "popbox.toml"
    path.write_text(
        f'[storage]\nmaildir_root = "{tmp_path / "mail"}"\n'
        f'[auth]\npasswd_file = "{tmp_path / "passwd"}"\ndefault_scheme = "SHA512-CRYPT"\n'
        + auth
    )
    return Site(path, load_config(path), tmp_path)


@pytest.fixture(params=["passwd-file", "postgresql"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "passwd-file":
        yield _site(tmp_path, "")
        return
    dsn = request.getfixturevalue("postgres_dsn")
    yield _site(tmp_path, f'backend = "postgresql"\n[postgresql]\ndsn = "{dsn}"\n')


def test_every_user_subcommand(site: Site) -> None:
    assert "added alice" in site.ok("user", "add", "alice", "--password-stdin", stdin="pw1\n")
    site.ok("user", "add", "bob", "--password-stdin", "--scheme", "PLAIN", stdin="bob\n")
    assert site.run("user", "add", "alice", "--password-stdin", stdin="x\n").exit_code == 1
    assert site.verify("alice", "pw1") is not None
    site.ok("user", "passwd", "alice", "--password-stdin", "--scheme", "BLF-CRYPT", stdin="pw2\n")
    assert site.verify("alice", "pw1") is None
    assert site.verify("alice", "pw2") is not None
    site.ok("user", "quota", "alice", "--messages", "10", "--size", "1M")
    record = site.verify("alice", "pw2")
    assert record is not None
    assert (record.quota_messages, record.quota_octets) == (10, 1024**2)

    listing = site.ok("user", "list")
    assert "alice" in listing
    assert "bob" in listing
    shown = site.ok("user", "show", "alice")
    assert "user alice" in shown
    assert str(site.tmp / "mail" / "alice") in shown

    output = site.ok("user", "app-password", "add", "alice", "phone")
    password = output.strip().splitlines()[-1]
    assert re.fullmatch(r"([a-z2-7]{4}-){7}[a-z2-7]{4}", password)
    by_phone = site.verify("alice", password)
    assert by_phone is not None
    assert by_phone.credential == "phone"
    assert "phone" in site.ok("user", "app-password", "list", "alice")
    assert site.run("user", "app-password", "add", "nobody", "phone").exit_code == 1
    site.ok("user", "app-password", "revoke", "alice", "phone")
    assert site.verify("alice", password) is None
    assert "no app passwords" in site.ok("user", "app-password", "list", "alice")

    site.ok("user", "apop-secret", "alice", "--secret-stdin", stdin="apop words\n")
    assert site.apop("alice") == "apop words"

    assert "removed alice" in site.ok("user", "del", "alice")
    assert site.verify("alice", "pw2") is None
    assert site.apop("alice") is None
    failed = site.run("user", "show", "alice")
    assert failed.exit_code == 1
    assert "no user alice" in failed.output


def test_import_passwd_moves_a_site_in_one_command(site: Site) -> None:
    passwd = site.tmp / "dovecot-users"
    passwd.write_text(
        "alice:{PLAIN}alice-pw::::/home/alice::userdb_quota_rule=*:messages=5\n"
        "bob:{PLAIN}bob-pw\n"
    )
    (site.tmp / "dovecot-users.app-passwords").write_text(
        "alice:apop:apop::{PLAIN}apop secret:1767225600\n"
    )
    result = site.run("user", "import-passwd", str(passwd))
    if site.config.auth.backend != "postgresql":
        assert result.exit_code == 1
        assert 'auth.backend = "postgresql"' in result.output
        return
    assert result.exit_code == 0, result.output
    assert "2 added, 0 updated, 0 unchanged" in result.output
    assert "1 added" in result.output.split("APOP secrets:")[1]
    again = site.ok("user", "import-passwd", str(passwd))
    assert "0 added, 0 updated, 2 unchanged" in again
    alice = site.verify("alice", "alice-pw")
    assert alice == UserRecord("alice", quota_messages=5, home="/home/alice")
    assert site.apop("alice") == "apop secret"
