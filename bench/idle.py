"""Idle sessions at scale: popbox alone, tens of thousands of authenticated idle sessions.

    .venv/bin/python -m bench.idle --sessions 50000            # plain, then implicit TLS
    .venv/bin/python -m bench.idle --sessions 2000 --security tls --workers 1

bench.run compares the idle figure with Dovecot at 2,000 sessions; Dovecot's shape
(~0.5 MiB per session) cannot hold 50,000 on a 24 GiB machine, so this runs popbox
alone. It writes N users (one passwd line each, the bench's SHA512-CRYPT hash at 5,000
rounds) with empty pre-made Maildirs, starts ``popbox serve`` with its caps raised,
and opens the sessions from several load-generator processes: each connects (implicit
TLS or plain), logs in with USER/PASS, sends STAT and stays. Logins are paced by a
bound on the logins in flight, since each costs the server a password hash.

Loopback has one ephemeral port range (~28,000 ports) per source address, so the
sessions come from 127.0.0.2, 127.0.0.3, ... (a fresh set per phase, so the previous
phase's TIME_WAIT ports are no obstacle); RLIMIT_NOFILE is raised for the server and
the clients.

Reported per phase: the server tree's PSS before and loaded, per session, the time to
establish every session, and the number of sessions that answered a NOOP at the end
(every one must, or the memory figure would be of sessions the server had dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dataset as ds
from bench import loadgen, servers
from bench.loadgen import Pop3Client, Pop3Error

__all__ = ["IdleFigure", "main", "run_phase"]

DEFAULT_WORK: Final = Path("/var/tmp/popbox-bench-idle")
# Below the ~28,000 ports of Linux's default ephemeral range for one source address.
SESSIONS_PER_SOURCE: Final = 20_000
# A session whose connect or login fails is tried again this many times, then counted.
ATTEMPTS: Final = 3
# The sessions opened first wait for the last ones; popbox's default idle timeout (600 s,
# RFC 1939's minimum) would close them if establishing 50,000 took longer than that.
IDLE_TIMEOUT: Final = 3600
USER_PREFIX: Final = "idle"
# Sessions opened and closed before the baseline is taken (see main).
WARMUP: Final = 200
# A logged-in session holds its socket and its maildrop's lock file open.
SERVER_FDS_PER_SESSION: Final = 2
# Listeners, log, passwd file, the event loop's own descriptors.
FD_RESERVE: Final = 1024
# The kernel spreads connections over the workers unevenly (one of 7 workers took 1.4x
# its share in a 50,000-session run and ran out of descriptors): leave this much room.
IMBALANCE: Final = 1.6


def processes_for(descriptors: int, limit: int) -> int:
    """How many processes keep ``descriptors`` under ``limit`` each, with headroom.

    RLIMIT_NOFILE is per process, and a hard limit below what 50,000 sessions need
    (20,000 where CAP_SYS_RESOURCE is missing, as in some containers) is met by
    spreading the sessions over more processes.
    """
    return max(1, -(-int(descriptors * IMBALANCE) // max(limit - FD_RESERVE, 1)))


@dataclass
class IdleFigure:
    """One phase: N sessions of one security, held at once."""

    security: str
    sessions: int
    opened: int
    failed_attempts: int
    establish_s: float
    baseline_kib: int
    loaded_kib: int
    per_session_kib: float
    noop_ok: int
    server_processes: int
    client_kib: int
    establish_server_cpu_s: float

    def line(self) -> str:
        return (f"{self.security}: {self.opened}/{self.sessions} sessions in "
                f"{self.establish_s:.1f} s ({self.opened / self.establish_s:.0f}/s), server PSS "
                f"{self.baseline_kib / 1024:.1f} -> {self.loaded_kib / 1024:.1f} MiB = "
                f"{self.per_session_kib:.2f} KiB/session over {self.server_processes} "
                f"processes; NOOP answered by {self.noop_ok}; load generator PSS "
                f"{self.client_kib / 1024:.0f} MiB; {self.failed_attempts} failed attempts; "
                f"server CPU {self.establish_server_cpu_s / max(self.opened, 1) * 1000:.2f} ms "
                "per session established")


def user_name(number: int) -> str:
    return f"{USER_PREFIX}{number:05d}"


def prepare(work: Path, sessions: int) -> tuple[Path, Path, Path]:
    """(server root, cert, key): N users with empty Maildirs, reused when already there."""
    root = work / "popbox"
    cert, key = work / "tls" / "cert.pem", work / "tls" / "key.pem"
    from popbox.auth.schemes import DEFAULT_COST, HashCost, hash_password
    from popbox.net.tls_context import ensure_self_signed_cert

    ensure_self_signed_cert(cert, key, "localhost")
    stamp = root / "stamp.json"
    wanted = {"sessions": sessions, "rounds": ds.HASH_ROUNDS, "format": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return root, cert, key
    if root.exists():
        shutil.rmtree(root)
    mail = root / "mail"
    mail.mkdir(parents=True)
    cost = HashCost(argon2_time_cost=DEFAULT_COST.argon2_time_cost,
                    argon2_memory_kib=DEFAULT_COST.argon2_memory_kib,
                    sha_crypt_rounds=ds.HASH_ROUNDS)
    stored = hash_password(ds.PASSWORD, "SHA512-CRYPT", cost=cost)
    lines = []
    for number in range(sessions):
        user = user_name(number)
        for sub in ("cur", "new", "tmp"):
            (mail / user / sub).mkdir(parents=True)
        lines.append(f"{user}:{stored}::::::\n")
    passwd = root / "passwd"
    passwd.write_text("".join(lines))
    os.chmod(passwd, 0o600)
    stamp.write_text(json.dumps(wanted))
    return root, cert, key


# -- the load generator's processes ---------------------------------------------------


@dataclass
class _Job:
    host: str
    port: int
    tls: bool
    cafile: str
    users: list[int]
    first_source: int
    parallel: int


async def _open(job: _Job, number: int, context: ssl.SSLContext | None) -> Pop3Client:
    source = f"127.0.0.{job.first_source + number // SESSIONS_PER_SOURCE}"
    transport, buffer = await asyncio.get_running_loop().create_connection(
        loadgen._ReceiveBuffer, job.host, job.port, ssl=context,
        server_hostname="localhost" if context else None, local_addr=(source, 0))
    client = Pop3Client(transport, buffer)
    try:
        await client.expect_ok()
        await client.login(user_name(number), ds.PASSWORD)
        await client.command("STAT")
    except BaseException:
        await client.close()
        raise
    return client


async def _hold(job: _Job, pipe: Connection) -> None:
    context = loadgen.client_tls_context(Path(job.cafile)) if job.tls else None
    gate = asyncio.Semaphore(job.parallel)
    clients: list[Pop3Client] = []
    failures = [0]
    errors: list[str] = []

    async def open_one(number: int) -> None:
        async with gate:
            for _ in range(ATTEMPTS):
                try:
                    clients.append(await _open(job, number, context))
                    return
                except (OSError, ssl.SSLError, Pop3Error, TimeoutError) as exc:
                    failures[0] += 1
                    if len(errors) < 5:
                        errors.append(f"{user_name(number)}: {exc!r}")

    start = time.perf_counter()
    await asyncio.gather(*(open_one(number) for number in job.users))
    pipe.send(("ready", len(clients), failures[0], time.perf_counter() - start, errors))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipe.recv)  # "noop"

    async def noop(client: Pop3Client) -> bool:
        try:
            await asyncio.wait_for(client.command("NOOP"), 60)
        except (OSError, ssl.SSLError, Pop3Error, TimeoutError):
            return False
        return True

    answered = await asyncio.gather(*(noop(client) for client in clients))
    pipe.send(("noop", sum(answered)))
    await loop.run_in_executor(None, pipe.recv)  # "close"

    async def quit_one(client: Pop3Client) -> None:
        async with gate:
            with contextlib.suppress(OSError, ssl.SSLError, Pop3Error, TimeoutError):
                await asyncio.wait_for(client.quit(), 30)

    await asyncio.gather(*(quit_one(client) for client in clients))
    pipe.send(("closed",))


def _client_main(job: _Job, pipe: Connection) -> None:
    from bench.run import asyncio_run

    asyncio_run(_hold(job, pipe))


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_phase(server: servers.Server, cafile: Path, *, security: str, sessions: int,
              clients: int, parallel: int, first_source: int, settle: float = 3.0) -> IdleFigure:
    """Open ``sessions`` idle sessions from ``clients`` processes, measure, close them."""
    tls = security == "tls"
    port = server.pop3s_port if tls else server.pop3_port
    time.sleep(settle)
    baseline = server.pss_kib()
    spawn = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    processes: list[Any] = []
    for index in range(clients):
        users = list(range(sessions))[index::clients]
        parent, child = spawn.Pipe()
        job = _Job(server.host, port, tls, str(cafile), users, first_source, parallel)
        process = spawn.Process(target=_client_main, args=(job, child), daemon=True)
        process.start()
        pipes.append(parent)
        processes.append(process)
    try:
        start = time.perf_counter()
        cpu = server.cpu_seconds()
        ready = [pipe.recv() for pipe in pipes]
        establish = time.perf_counter() - start
        cpu = server.cpu_seconds() - cpu
        opened = sum(message[1] for message in ready)
        failed = sum(message[2] for message in ready)
        for message in ready:
            for error in message[4]:
                print(f"    failed: {error}", flush=True)
        time.sleep(settle)
        loaded = server.pss_kib()
        processes_loaded = server.process_count()
        client_kib = sum(_pss_kib(process.pid) for process in processes)
        for pipe in pipes:
            pipe.send("noop")
        noop_ok = sum(pipe.recv()[1] for pipe in pipes)
        for pipe in pipes:
            pipe.send("close")
        for pipe in pipes:
            pipe.recv()
    finally:
        for process in processes:
            process.join(120)
            if process.is_alive():
                process.kill()
    return IdleFigure(security, sessions, opened, failed, establish, baseline, loaded,
                      (loaded - baseline) / max(opened, 1), noop_ok, processes_loaded,
                      client_kib, cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=50_000, help="idle sessions (50000)")
    parser.add_argument("--security", default="plain,tls",
                        help="phases, comma-separated: plain, tls (plain,tls)")
    parser.add_argument("--workers", type=int,
                        help="pop3.workers (default: the number of cores, or more when the "
                        "fd limit needs it)")
    parser.add_argument("--clients", type=int,
                        help="load generator processes (default: 2, or more when the fd "
                        "limit needs it)")
    parser.add_argument("--parallel", type=int, default=32,
                        help="logins in flight per load generator process (32)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"users, Maildirs and the server's files ({DEFAULT_WORK})")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    phases = [name for name in args.security.split(",") if name]
    for name in phases:
        if name not in ("plain", "tls"):
            parser.error(f"--security: {name!r} is not plain or tls")
    from bench.run import raise_fd_limit

    limit = raise_fd_limit(args.sessions * SERVER_FDS_PER_SESSION + FD_RESERVE)
    workers = args.workers or max(os.cpu_count() or 1,
                                  processes_for(args.sessions * SERVER_FDS_PER_SESSION, limit))
    clients = args.clients or max(2, processes_for(args.sessions, limit))
    print(f"RLIMIT_NOFILE {limit}: {workers} popbox workers, {clients} load generator "
          "processes", flush=True)
    sources = -(-args.sessions // SESSIONS_PER_SOURCE)
    if 2 + sources * len(phases) > 255:
        parser.error("--sessions: too many for the 127.0.0.x source addresses")
    print(f"preparing {args.sessions} users under {args.work}", flush=True)
    root, cert, key = prepare(args.work, args.sessions)
    caps = {
        "max_connections_per_ip": args.sessions + 1000,
        "max_login_sessions": args.sessions + 1000,
        "max_sessions_per_user": 10,
        "idle_timeout": IDLE_TIMEOUT,
    }
    figures: list[IdleFigure] = []
    for index, security in enumerate(phases):
        # A fresh server per phase: memory freed by the previous phase's sessions would
        # otherwise be reused and make the second figure look smaller than it is.
        server = servers.start_popbox(root, cert, key, workers=workers, limits=caps)
        try:
            # The first sessions pay one-time costs (the hashing threads, imports, the
            # heap's first growth); at 2,000 sessions those would be ~10% of the figure.
            run_phase(server, cert, security=security, sessions=min(WARMUP, args.sessions),
                      clients=1, parallel=args.parallel, first_source=2 + index * sources,
                      settle=0.5)
            print(f"{security}: opening {args.sessions} sessions", flush=True)
            figure = run_phase(server, cert, security=security, sessions=args.sessions,
                               clients=clients, parallel=args.parallel,
                               first_source=2 + index * sources)
        finally:
            server.stop()
        print("  " + figure.line(), flush=True)
        figures.append(figure)
    if args.json:
        args.json.write_text(json.dumps({
            "fd_limit": limit, "workers": workers, "clients": clients,
            "parallel": args.parallel, "phases": [asdict(figure) for figure in figures],
        }, indent=1))
    complete = all(f.opened == f.sessions and f.noop_ok == f.sessions for f in figures)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
