"""A real, private PostgreSQL server on loopback for tests, in a temporary directory.

PostgreSQL comes from Debian's postgresql package. ``initdb`` makes a cluster under
the temp directory, owned by the unprivileged ``postgres`` user when the tests run as
root (PostgreSQL refuses to run as root), with trust authentication on loopback only.
One server is started per test session (tests/conftest.py, ``postgres_server``) and
each test gets a database of its own (``postgres_dsn``); a test that restarts or
stops the server starts a private one (``start_postgres``) so others are undisturbed.

The server runs with ``fsync = off``: the tests kill popbox, not the machine, and a
committed transaction survives a PostgreSQL crash or restart without it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from support.ports import free_port

__all__ = ["PostgresServer", "postgres_skip_reason", "start_existing", "start_postgres"]

SUPERUSER = "popbox"
# Debian's postgresql package makes this user; the cluster runs as it under root.
OS_USER = "postgres"
_numbers = itertools.count(1)


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_skip_reason() -> str | None:
    if _bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"no {OS_USER!r} user to run PostgreSQL as"
    return None


@dataclass
class PostgresServer:
    """A running private cluster: ``dsn(db)`` connects to database ``db`` as superuser."""

    root: Path
    port: int
    bindir: Path
    host: str = "127.0.0.1"
    durable: bool = False
    """Keep fsync on (benchmarks); tests run without it."""

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its DSN."""
        name = name or f"t{os.getpid()}_{next(_numbers)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.dsn(name)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OS_USER, "--", *command]
        return subprocess.run(command, capture_output=True, check=check, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses={self.host} -k {self.root} "
        options += "-c max_connections=200 "
        options += "-c shared_buffers=128MB" if self.durable else (
            "-c shared_buffers=64MB -c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "log"), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_postgres(root: Path, *, durable: bool = False) -> PostgresServer:
    """initdb and start a cluster under ``root`` (made and owned as needed), whose
    parents the postgres user can traverse (tests/conftest.py's shared_tmp)."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed")
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)  # its parents: see shared_tmp
    server = PostgresServer(root, free_port(), bindir, durable=durable)
    server._run(
        "initdb", "-D", str(server.datadir), "-U", SUPERUSER, "--auth=trust",
        "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
    )  # fmt: skip
    for attempt in range(3):
        try:
            server.start()
            break
        except subprocess.CalledProcessError:
            if attempt == 2:
                raise RuntimeError("PostgreSQL did not start:\n" + server.log()) from None
            server.port = free_port()  # someone took the port meanwhile
            time.sleep(0.2)
    return server


def start_existing(root: Path, port: int, *, durable: bool = False) -> PostgresServer:
    """Start again a cluster that ``start_postgres`` made under ``root`` (benchmarks
    that keep a loaded database between runs)."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed")
    server = PostgresServer(root, port, bindir, durable=durable)
    server.start()
    return server
