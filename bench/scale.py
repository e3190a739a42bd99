"""popbox on PostgreSQL against popbox on Maildir and Dovecot, and one node against two.

    .venv/bin/python -m bench.scale            # full sizes (100,000-message maildrop)
    .venv/bin/python -m bench.scale --quick    # small sizes, a few minutes

The same generated data as bench.run (bench.dataset): each server gets its own copy;
popbox on PostgreSQL gets it the way a site would, with ``popbox user import-passwd``
and ``popbox migrate maildir-to-postgresql --all`` into a private PostgreSQL cluster.
Repetitions alternate the servers. Server CPU is the process tree's, and for popbox
on PostgreSQL it includes every PostgreSQL process: the database's work is part of
the cost of a login or a gigabyte. The scaling part puts HAProxy in front of one
node and then of two (both on this machine, with PostgreSQL and the load generator:
see the report's note). Writes bench/results/scale-<timestamp>/ and the section of
docs/performance.md between its scale markers. Must run as root (Dovecot, initdb).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench import dataset as ds
from bench import loadgen, mailgen, servers
from bench.run import asyncio_run, environment, raise_fd_limit, warm_page_cache

REPO: Final = Path(__file__).resolve().parent.parent
# The private PostgreSQL and HAProxy starters the tests use (tests/support).
sys.path.insert(0, str(REPO / "tests"))
from support.haproxy import HAProxy, addresses, render  # noqa: E402
from support.postgres import PostgresServer, start_existing, start_postgres  # noqa: E402

RESULTS: Final = REPO / "bench" / "results"
DOC: Final = REPO / "docs" / "performance.md"
BEGIN: Final = "<!-- scale:begin -->"
END: Final = "<!-- scale:end -->"
POPBOX_CLI: Final = servers.POPBOX
PG: Final = "popbox-pg"
MAILDIR: Final = "popbox-maildir"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool


ROWS: Final = [
    Row("login.plain.20", "logins/s, plain USER/PASS, 20 clients", "logins/s", True),
    Row("login.plain.20.cpu", "server CPU per login, plain", "ms", False),
    Row("login.tls.20", "logins/s, implicit TLS + AUTH PLAIN, 20 clients", "logins/s", True),
    Row("login.tls.20.cpu", "server CPU per login, implicit TLS", "ms", False),
    Row("retr.plain.4", "RETR, plain, 4 clients", "MB/s", True),
    Row("retr.plain.4.cpu", "server CPU per GB, RETR plain", "CPU s/GB", False),
    Row("retr.tls.4", "RETR, implicit TLS, 4 clients", "MB/s", True),
    Row("retr.tls.4.cpu", "server CPU per GB, RETR TLS", "CPU s/GB", False),
    Row("churn", "churn: poll sessions while mail arrives over LMTP", "sessions/s", True),
    Row("churn.cpu", "server CPU per churn session (delivery included)", "ms", False),
    Row("bigbox.warm", "big maildrop, login to the last UIDL line, warm", "s", False),
    Row("bigbox.cold", "big maildrop, login to the last UIDL line, cold", "s", False),
]
SCALE_ROWS: Final = [
    Row("nodes.login.plain.20", "logins/s through HAProxy, 20 clients", "logins/s", True),
    Row("nodes.login.plain.20.cpu", "CPU per login (popbox + PostgreSQL)", "ms", False),
    Row("nodes.retr.plain.8", "RETR through HAProxy, 8 clients", "MB/s", True),
    Row("nodes.retr.plain.8.cpu", "CPU per GB (popbox + PostgreSQL)", "CPU s/GB", False),
]


@dataclass
class Tree(servers.Server):
    """A server whose cost includes other process trees (PostgreSQL, more nodes)."""

    others: list[Callable[[], list[int]]] = field(default_factory=list)

    def pids(self) -> list[int]:
        found = super().pids()
        for more in self.others:
            found.extend(more())
        return found


def postgres_pids(cluster: PostgresServer) -> list[int]:
    import psutil

    try:
        master = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(master)
        return [master, *(child.pid for child in process.children(recursive=True))]
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return []


class Bench:
    def __init__(self, quick: bool, reps: int, work: Path) -> None:
        self.quick = quick
        self.reps = reps
        self.work = work
        if quick:
            self.sizes = ds.Sizes(retr_messages=60, idle_users=10, bigbox_messages=20_000)
            self.seconds = (1.5, 2.0, 3.0)
        else:
            self.sizes = ds.Sizes(idle_users=10)
            self.seconds = (3.0, 4.0, 6.0)
        self.dataset = ds.build(work / "data", self.sizes)
        self.tls = loadgen.client_tls_context(self.dataset.cert)
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.notes: list[str] = []
        self.cluster: PostgresServer | None = None
        self.loaded = 0.0
        self.moved = 0
        self.first_done: set[tuple[str, str]] = set()
        self.run_id = time.strftime("%Y%m%d%H%M%S")

    # -- servers -------------------------------------------------------------------

    def prepare_postgresql(self, reuse: bool = False) -> None:
        """A cluster with the data loaded the way a site moves in; ``reuse``: the
        cluster an earlier run of the same sizes loaded, if it is there."""
        marker = self.work / "pg" / "loaded.json"
        if reuse and marker.exists():
            kept = json.loads(marker.read_text())
            cluster = start_existing(self.work / "pg", kept["port"], durable=True)
            self.cluster, self.dsn = cluster, kept["dsn"]
            self.loaded, self.moved = kept["seconds"], kept["moved"]
            return
        shutil.rmtree(self.work / "pg", ignore_errors=True)
        cluster = start_postgres(self.work / "pg", durable=True)
        self.cluster = cluster
        dsn = cluster.create_database("popbox")
        root = self.work / PG
        ds.install(self.dataset, root, owner=None)
        config = root / "load.toml"
        config.write_text(
            f'data_dir = "{root}"\n[auth]\npasswd_file = "{root / "passwd"}"\n'
            f'backend = "postgresql"\n[storage]\nmaildir_root = "{root / "mail"}"\n'
            f'[postgresql]\ndsn = "{dsn}"\n'
        )
        started = time.perf_counter()
        d = self.dataset
        measured = sorted({*d.login_users(), *d.retr_users(), *d.churn_users(), d.bigbox_users[0]})
        self.moved = len(measured)
        for command in (
            ["user", "import-passwd", str(root / "passwd")],
            ["migrate", "maildir-to-postgresql", *measured],
        ):
            subprocess.run([POPBOX_CLI, *command, "--config", str(config)], check=True,
                           stdout=subprocess.DEVNULL)
        # What a DBA does after a bulk load: statistics and a checkpoint, so that
        # autovacuum and the checkpointer do not run inside the first figures.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")
        self.loaded = time.perf_counter() - started
        self.dsn = dsn
        marker.write_text(json.dumps({"port": cluster.port, "dsn": dsn,
                                      "seconds": self.loaded, "moved": self.moved}))

    def start(self, name: str) -> servers.Server:
        d = self.dataset
        if name == MAILDIR:
            return servers.start_popbox(self.work / MAILDIR, d.cert, d.key, name=MAILDIR)
        if name == PG:
            assert self.cluster is not None
            cluster = self.cluster
            node = servers.start_popbox(self.work / PG, d.cert, d.key, name=PG,
                                        postgresql=self.dsn, config_name="node1.toml")
            return Tree(**vars(node), others=[lambda: postgres_pids(cluster)])
        return servers.start_dovecot(self.work / "dovecot", name, d.cert, d.key, sessions=10)

    @contextlib.contextmanager
    def nodes(self, count: int) -> Iterator[servers.Server]:
        """``count`` popbox nodes (1 or 2) on the PostgreSQL data behind one HAProxy
        running contrib/haproxy/haproxy.cfg; with one node, both of its server lines
        name that node."""
        assert self.cluster is not None
        cluster, d = self.cluster, self.dataset
        started = [
            servers.start_popbox(self.work / PG, d.cert, d.key, name=f"{PG}-{n}",
                                 postgresql=self.dsn, config_name=f"node{n}.toml",
                                 proxy_from="127.0.0.1")
            for n in range(1, count + 1)
        ]
        ports = [(node.pop3_port, node.pop3s_port, node.lmtp_port) for node in started]
        front = (servers.free_port(), servers.free_port(), servers.free_port())
        directory = self.work / f"haproxy-{count}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        proxy = HAProxy(directory, render(addresses("127.0.0.1", front, (ports * 2)[:2])))
        proxy.start()
        try:
            proxy.wait_for({("popbox_pop3", name): "UP" for name in ("node1", "node2")})
            first = started[0]
            yield Tree(
                name=f"{count} node(s)", kind="popbox", root=first.root,
                maildir_root=first.maildir_root, pop3_port=front[0], pop3s_port=front[1],
                lmtp_port=front[2], process=first.process,
                others=[*(node.pids for node in started[1:]), lambda: postgres_pids(cluster)],
            )
        finally:
            proxy.stop()
            for node in started:
                node.stop()

    # -- measuring ---------------------------------------------------------------------

    def record(self, key: str, server: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(server, []).append(value)
        print(f"    {key:26s} {server:20s} {value:12.3f}", flush=True)

    async def scenarios(self, server: servers.Server, name: str, rep: int) -> None:
        d, pw = self.dataset, ds.PASSWORD
        login_s, retr_s, churn_s = self.seconds
        for security, mechanism in (("plain", "user"), ("tls", "plain")):
            result = await loadgen.login_rate(
                server, d.login_users(), pw, clients=20, security=security, tls=self.tls,
                duration=login_s, mechanism=mechanism)
            self.record(f"login.{security}.20", name, result.value)
            sessions = max(1.0, result.extra["sessions"])
            self.record(f"login.{security}.20.cpu", name, result.server_cpu / sessions * 1e3)
        warm_page_cache(server.maildir_root, d.retr_users())
        manifests = {user: d.retr_manifest(user) for user in d.retr_users()}
        for security in ("plain", "tls"):
            result = await loadgen.retr_throughput(
                server, d.retr_users(), manifests, pw, clients=4, security=security,
                tls=self.tls, duration=retr_s)
            self.record(f"retr.{security}.4", name, result.value)
            self.record(f"retr.{security}.4.cpu", name, result.extra["server_cpu_s_per_gb"])
        result = await loadgen.churn(
            server, d.churn_users(), pw, duration=churn_s, deliveries_per_second=50.0,
            # Unique per run: a delivery of the very same bytes to the same user
            # within [postgresql] duplicate_window is recognised as an MTA's retry.
            message_source=lambda n: mailgen.message(ds.SEED, f"scale-{self.run_id}-{rep}",
                                                      n, mailgen.SMALL))
        self.record("churn", name, result.value)
        self.record("churn.cpu", name,
                    result.server_cpu / max(1.0, result.extra["sessions"]) * 1e3)


    async def bigbox(self, server: servers.Server, name: str) -> None:
        """On a server of its own, started for it (as bench.run does): its first
        sweep must not hold the big folder while it is measured."""
        d, pw = self.dataset, ds.PASSWORD
        user = d.bigbox_users[0]
        count = self.sizes.bigbox_messages
        if name == PG:
            assert self.cluster is not None
            self.cluster.restart()
        else:
            # The first login after the files were written also moves new/ to cur/
            # (bench.run shows it apart); it is done once, outside the figures.
            if (name, user) not in self.first_done:
                await loadgen.bigbox_login(server, user, pw, count)
                self.first_done.add((name, user))
            server.forget_index(user)
        servers.drop_caches()
        result = await loadgen.bigbox_login(server, user, pw, count)
        self.record("bigbox.cold", name, result.value)
        result = await loadgen.bigbox_login(server, user, pw, count)
        self.record("bigbox.warm", name, result.value)

    async def scaling(self, server: servers.Server, nodes: int) -> None:
        d, pw = self.dataset, ds.PASSWORD
        login_s, retr_s, _ = self.seconds
        name = f"{nodes} node" + ("s" if nodes > 1 else "")
        result = await loadgen.login_rate(server, d.login_users(), pw, clients=20,
                                          security="plain", tls=self.tls, duration=login_s)
        self.record("nodes.login.plain.20", name, result.value)
        self.record("nodes.login.plain.20.cpu", name,
                    result.server_cpu / max(1.0, result.extra["sessions"]) * 1e3)
        manifests = {user: d.retr_manifest(user) for user in d.retr_users()}
        result = await loadgen.retr_throughput(server, d.retr_users(), manifests, pw,
                                               clients=8, security="plain", tls=self.tls,
                                               duration=retr_s)
        self.record("nodes.retr.plain.8", name, result.value)
        self.record("nodes.retr.plain.8.cpu", name, result.extra["server_cpu_s_per_gb"])

    def run(self, reuse: bool) -> None:
        print("loading PostgreSQL (popbox user import-passwd, popbox migrate)", flush=True)
        self.prepare_postgresql(reuse)
        ds.install(self.dataset, self.work / MAILDIR, owner=None)
        ds.install(self.dataset, self.work / "dovecot", owner=servers.mail_ids())
        order = [PG, MAILDIR, *servers.DOVECOT_MODES]
        for rep in range(self.reps):
            print(f"repetition {rep + 1}/{self.reps}: {', '.join(order)}", flush=True)
            for name in order:
                server = self.start(name)
                try:
                    asyncio_run(self.scenarios(server, name, rep))
                finally:
                    server.stop()
                server = self.start(name)
                try:
                    asyncio_run(self.bigbox(server, name))
                finally:
                    server.stop()
            for count in ((1, 2) if rep % 2 == 0 else (2, 1)):
                with self.nodes(count) as front:
                    asyncio_run(self.scaling(front, count))
            order = order[1:] + order[:1]

    # -- report --------------------------------------------------------------------------

    def median(self, key: str, server: str) -> float | None:
        values = self.samples.get(key, {}).get(server)
        return statistics.median(values) if values else None

    def table(self) -> str:
        head = ["figure", "unit", PG, MAILDIR, "best Dovecot", "pg/maildir", "pg/Dovecot"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in ROWS:
            pg, maildir = self.median(row.key, PG), self.median(row.key, MAILDIR)
            dovecots = [v for m in servers.DOVECOT_MODES
                        if (v := self.median(row.key, m)) is not None]
            best = (max if row.higher_is_better else min)(dovecots) if dovecots else None
            lines.append("| " + " | ".join([
                row.label, row.unit, _fmt(pg), _fmt(maildir), _fmt(best),
                _ratio(pg, maildir), _ratio(pg, best)]) + " |")
        lines += ["", "| through HAProxy | unit | 1 node | 2 nodes | 2/1 |",
                  "|---|---|---|---|---|"]
        for row in SCALE_ROWS:
            one, two = self.median(row.key, "1 node"), self.median(row.key, "2 nodes")
            lines.append(f"| {row.label} | {row.unit} | {_fmt(one)} | {_fmt(two)} | "
                         f"{_ratio(two, one)} |")
        return "\n".join(lines)

    def write(self, started: float) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"scale-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        sizes = self.sizes
        text = "\n".join([
            f"_`python -m bench.scale{' --quick' if self.quick else ''}`, {self.reps} "
            f"alternating repetitions, medians; {time.strftime('%Y-%m-%d')}, "
            f"{(time.time() - started) / 60:.0f} minutes._",
            "",
            *(f"- {line}" for line in environment()),
            f"- PostgreSQL {_pg_version()}: a private cluster on loopback with its durable "
            "defaults (fsync and synchronous_commit on), shared_buffers 128 MB.",
            "- the data went into PostgreSQL with `popbox user import-passwd`, then "
            f"`popbox migrate maildir-to-postgresql` of the {self.moved} measured "
            f"mailboxes, the {sizes.bigbox_messages:,}-message one included"
            + (f": {self.loaded:.0f} s" if self.loaded > 0 else
               " (by an earlier run of the same sizes, --reuse-database)"),
            "- server CPU: the server's process tree; for popbox-pg plus every PostgreSQL "
            "process (the database's work is part of each login and gigabyte).",
            "- cold big maildrop: popbox-maildir and Dovecot without their index; popbox-pg "
            "after a PostgreSQL restart (shared buffers empty); the page cache dropped.",
            "",
            self.table(),
            "",
            *(f"- {note}" for note in self.notes),
        ])
        (out / "report.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(self.samples, indent=1))
        return text


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def _pg_version() -> str:
    out = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False)
    # "psql (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)": the third word.
    words = out.stdout.split()
    return words[2] if len(words) > 2 else "?"


def update_doc(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN not in doc:
        doc += f"\n## PostgreSQL and more than one node\n\n{BEGIN}\n{END}\n"
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--reuse-database", action="store_true",
                        help="start the PostgreSQL cluster an earlier run of the same "
                        "sizes loaded, instead of loading it again")
    args = parser.parse_args(argv)
    raise_fd_limit(65536)
    work = args.work or Path("/var/tmp/popbox-scale" + ("-quick" if args.quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bench = Bench(args.quick, args.reps, work)
    try:
        bench.run(args.reuse_database)
    finally:
        if bench.cluster is not None:
            bench.cluster.stop()
    text = bench.write(started)
    print(text)
    if not args.no_doc:
        update_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
