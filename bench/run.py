"""The benchmark runner: popbox against Dovecot, alternating, then a report.

    .venv/bin/python -m bench.run            # full run (~20 min on 2 cores)
    .venv/bin/python -m bench.run --quick    # small sizes, ~5 min

Builds (or reuses) the generated data under --work, gives each server its own copy,
and for every repetition starts each server in turn (the order rotates per
repetition, so drift on a shared machine hits all of them alike), runs every scenario
against it and stops it. Then the collector comparison and the py-spy profiles.
Writes bench/results/<timestamp>/{report.md,results.json,chart.png,profiles/} and
copies the report into docs/performance.md between its markers. Must run as root
(Dovecot switches users; the page cache is dropped for cold figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    # `python bench/run.py` works too: make the repository importable as `bench`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dataset as ds
from bench import loadgen, mailgen, report, servers
from bench.report import Figure

REPO: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = REPO / "bench" / "results"
DOC: Final = REPO / "docs" / "performance.md"
BEGIN: Final = "<!-- bench:begin -->"
END: Final = "<!-- bench:end -->"
PROFILE_BEGIN: Final = "<!-- profile:begin -->"
COLLECTOR_HEADING: Final = "## Collector"
# Different sizes rebuild the data, so quick and full runs keep theirs apart.
FULL_WORK: Final = Path("/var/tmp/popbox-bench")
QUICK_WORK: Final = Path("/var/tmp/popbox-bench-quick")
KEPT_NOTE: Final = "_Kept from an earlier run: this run was made with --no-collector._"
PROFILE_END: Final = "<!-- profile:end -->"

FIGURES: Final = [
    Figure("login.plain.1", "login, plain USER/PASS, 1 client", "logins/s", True),
    Figure("login.plain.20", "login, plain USER/PASS, 20 clients", "logins/s", True, 2.0),
    Figure("login.stls.1", "login, STLS, 1 client", "logins/s", True),
    Figure("login.stls.20", "login, STLS, 20 clients", "logins/s", True, 2.0),
    Figure("login.tls.1", "login, implicit TLS + AUTH PLAIN, 1 client", "logins/s", True),
    Figure("login.tls.20", "login, implicit TLS + AUTH PLAIN, 20 clients", "logins/s", True, 2.0),
    Figure("retr.plain.1", "RETR, plain, 1 client", "MB/s", True),
    Figure("retr.plain.4", "RETR, plain, 4 clients", "MB/s", True, 3.0),
    Figure("retr.plain.8", "RETR, plain, 8 clients", "MB/s", True),
    Figure("retr.tls.4", "RETR, implicit TLS, 4 clients", "MB/s", True, 2.0),
    Figure("retr.plain.4.cpu", "server CPU per GB, RETR plain 4 clients", "CPU s/GB", False,
           1 / 3),
    Figure("retr.tls.4.cpu", "server CPU per GB, RETR TLS 4 clients", "CPU s/GB", False, 1 / 3),
    Figure("pipeline", "1,000 pipelined commands, time to last reply", "ms", False, 1.0),
    Figure("churn", "churn: poll sessions while mail arrives", "sessions/s", True, 3.0),
    Figure("idle.plain", "memory per idle session, plain", "KiB PSS", False, 1 / 20),
    Figure("idle.tls", "memory per idle session, implicit TLS", "KiB PSS", False, 1 / 20),
    Figure("bigbox.sized.cold", "big maildrop with S=/W=, cold login to UIDL", "s", False, 1.0),
    Figure("bigbox.sized.warm", "big maildrop with S=/W=, warm login to UIDL", "s", False, 0.5),
    Figure("bigbox.plain.cold", "big maildrop without sizes, cold login to UIDL", "s", False,
           1.0),
    Figure("bigbox.plain.warm", "big maildrop without sizes, warm login to UIDL", "s", False,
           0.5),
    Figure("bigbox.sized.first", "big maildrop with S=/W=, first login after writing", "s",
           False),
    Figure("bigbox.plain.first", "big maildrop without sizes, first login after writing", "s",
           False),
]
SERVERS: Final = ("popbox", *servers.DOVECOT_MODES)
# An earlier commit of popbox, measured in the same run (--baseline), under this name.
BASELINE: Final = "popbox-base"


@dataclass
class Settings:
    quick: bool
    reps: int
    work: Path
    sizes: ds.Sizes
    login_seconds: float
    retr_seconds: float
    churn_seconds: float
    churn_rate: float
    popbox_workers: int
    only: set[str] | None
    collector: bool
    profile: bool
    doc: bool = True
    baseline: Path | None = None

    @property
    def servers(self) -> tuple[str, ...]:
        if self.baseline is None:
            return SERVERS
        return ("popbox", BASELINE, *servers.DOVECOT_MODES)


# Each part runs on a server started for it. Idle memory in particular is measured on
# a fresh server, one per security: on a server that ran RETR first, new sessions fill
# heap pages the earlier work freed and the PSS difference understates them.
PARTS: Final = (
    ("main", "main"),
    ("idle.plain", "idle"),
    ("idle.tls", "idle"),
    ("bigbox", "bigbox"),
)


class Run:
    """Everything one benchmark run measured, and where it writes it."""

    def __init__(self, settings: Settings, dataset: ds.Dataset) -> None:
        self.settings = settings
        self.dataset = dataset
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.details: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.first_done: set[tuple[str, str]] = set()  # (mail copy, user)
        self.tls = loadgen.client_tls_context(dataset.cert)

    def record(self, key: str, server: str, rep: int, result: loadgen.Result,
               value: float | None = None) -> None:
        figure_value = result.value if value is None else value
        failed = int(result.extra.get("failed", 0))
        if failed:
            self.note(f"{key} on {server}, repetition {rep + 1}: {failed} sessions failed "
                      "(refused or reset) and were retried")
        self.samples.setdefault(key, {}).setdefault(server, []).append(figure_value)
        self.details.append({"figure": key, "server": server, "rep": rep,
                             "value": figure_value, **asdict(result)})
        unit = result.unit if value is None else "(derived)"
        print(f"    {key:22s} {server:20s} {figure_value:12.3f} {unit:12s} "
              f"server cpu {result.server_cpu:6.2f}s  loadgen cpu {result.client_cpu:6.2f}s  "
              f"wall {result.wall:6.2f}s", flush=True)

    def wanted(self, scenario: str) -> bool:
        if scenario == "main":  # the part that runs login, pipeline, retr and churn
            return any(self.wanted(name) for name in ("login", "pipeline", "retr", "churn"))
        return self.settings.only is None or scenario in self.settings.only

    async def scenarios(self, server: servers.Server, rep: int, part: str) -> None:
        """Run one part of the scenarios (see PARTS) against a freshly started server."""
        s, d, name = self.settings, self.dataset, server.name
        pw = ds.PASSWORD
        if part.startswith("idle."):
            security = part.removeprefix("idle.")
            result = await loadgen.idle_memory(server, d.idle_users(), pw,
                                               security=security, tls=self.tls)
            self.record(part, name, rep, result)
            return
        if part == "bigbox":
            await self.bigbox(server, rep)
            return
        if self.wanted("login"):
            for security in ("plain", "stls", "tls"):
                for clients in (1, 20):
                    # Implicit TLS logs in with AUTH PLAIN, the others with USER/PASS,
                    # so both ways to verify() are measured.
                    result = await loadgen.login_rate(
                        server, d.login_users(), pw, clients=clients, security=security,
                        tls=self.tls, duration=s.login_seconds,
                        mechanism="plain" if security == "tls" else "user")
                    self.record(f"login.{security}.{clients}", name, rep, result)
        if self.wanted("pipeline"):
            result = await loadgen.pipeline(server, d.login_users()[0], pw)
            self.record("pipeline", name, rep, result)
        if self.wanted("retr"):
            # The bigbox scenario of the server before dropped the page cache; RETR is
            # measured from memory, as a busy server's recent mail would be.
            warm_page_cache(server.maildir_root, d.retr_users())
            manifests = {user: d.retr_manifest(user) for user in d.retr_users()}
            for security, clients in (("plain", 1), ("plain", 4), ("plain", 8), ("tls", 4)):
                result = await loadgen.retr_throughput(
                    server, d.retr_users(), manifests, pw, clients=clients,
                    security=security, tls=self.tls, duration=s.retr_seconds)
                self.record(f"retr.{security}.{clients}", name, rep, result)
                if clients == 4:
                    self.record(f"retr.{security}.4.cpu", name, rep, result,
                                result.extra["server_cpu_s_per_gb"])
        if self.wanted("churn"):
            result = await loadgen.churn(
                server, d.churn_users(), pw, duration=s.churn_seconds,
                deliveries_per_second=s.churn_rate,
                message_source=lambda n: mailgen.message(ds.SEED, f"churn-{rep}", n,
                                                          mailgen.SMALL))
            self.record("churn", name, rep, result)

    async def bigbox(self, server: servers.Server, rep: int) -> None:
        count = self.settings.sizes.bigbox_messages
        for user, variant in zip(self.dataset.bigbox_users, ("sized", "plain"), strict=True):
            # Keyed by the copy of the mail: the two Dovecot shapes share one.
            copy = (str(server.root), user)
            if copy not in self.first_done:
                # The first login after the files were written also moves new/ to cur/;
                # it happens once per copy, so it is shown apart and not repeated.
                servers.drop_caches()
                result = await loadgen.bigbox_login(server, user, ds.PASSWORD, count)
                self.record(f"bigbox.{variant}.first", server.name, rep, result)
                self.first_done.add(copy)
            server.forget_index(user)
            if not servers.drop_caches():
                self.note("cold = no index (the page cache could not be dropped)")
            result = await loadgen.bigbox_login(server, user, ds.PASSWORD, count)
            self.record(f"bigbox.{variant}.cold", server.name, rep, result)
            result = await loadgen.bigbox_login(server, user, ds.PASSWORD, count)
            self.record(f"bigbox.{variant}.warm", server.name, rep, result)

    def save_progress(self) -> None:
        """Keep what was measured so far, in case a later part of the run fails."""
        path = RESULTS / "in-progress.json"
        path.write_text(json.dumps({"samples": self.samples, "notes": self.notes}, indent=1))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def start(self, name: str) -> servers.Server:
        work, d = self.settings.work, self.dataset
        if name == "popbox":
            return servers.start_popbox(work / "popbox", d.cert, d.key,
                                        workers=self.settings.popbox_workers)
        if name == BASELINE:
            return servers.start_popbox(work / BASELINE, d.cert, d.key,
                                        workers=self.settings.popbox_workers, name=BASELINE,
                                        source=self.settings.baseline)
        return servers.start_dovecot(work / "dovecot", name, d.cert, d.key,
                                     sessions=self.settings.sizes.idle_users)

    def run_servers(self) -> None:
        order = list(self.settings.servers)
        for rep in range(self.settings.reps):
            print(f"repetition {rep + 1}/{self.settings.reps}: {', '.join(order)}", flush=True)
            for name in order:
                print(f"  {name}", flush=True)
                for part, scenario in PARTS:
                    if not self.wanted(scenario):
                        continue
                    server = self.start(name)
                    try:
                        asyncio_run(self.scenarios(server, rep, part))
                    except Exception as exc:  # one failure must not lose the whole run
                        self.note(f"{name}, repetition {rep + 1}: {part} stopped by "
                                  f"{type(exc).__name__}: {exc}")
                        print(f"    FAILED: {exc!r}", flush=True)
                    finally:
                        server.stop()
                    self.save_progress()
            order = order[1:] + order[:1]


def warm_page_cache(root: Path, users: list[str]) -> None:
    for user in users:
        for directory, _, files in os.walk(root / user):
            for name in files:
                with open(os.path.join(directory, name), "rb") as handle:
                    while handle.read(1 << 20):
                        pass


def asyncio_run(coro: Awaitable[None]) -> None:
    # The load generator uses uvloop when it is there (popbox depends on it on Linux),
    # so that the client side costs as little CPU as it can.
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (root may raise the hard limit too); servers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def environment() -> list[str]:
    import psutil

    def version(command: list[str]) -> str:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    popbox_commit = version(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"])
    return [
        f"machine: {os.cpu_count()} cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.platform()}",
        f"Python {platform.python_version()}; Dovecot {version([servers.DOVECOT, '--version'])}",
        f"popbox at commit {popbox_commit}",
    ]


def baseline_line(baseline: Path) -> str:
    commit = subprocess.run(["git", "-C", str(baseline), "log", "-1", "--format=%h %s"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return (f"{BASELINE}: popbox at commit {commit or '?'} (from {baseline}), the same "
            "settings and its own copy of the mail; popbox/base is the ratio of the medians")


def write_report(run: Run, out: Path, started: float, extra_sections: list[str]) -> str:
    rows = report.summarise(FIGURES, run.samples)
    table = report.markdown_table(rows, run.settings.servers, BASELINE)
    report.chart(rows, out / "chart.png", "popbox vs the better Dovecot shape, per figure")
    s = run.settings
    sizes = s.sizes
    lines = [
        f"Run of {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
        f"{(time.time() - started) / 60:.1f} minutes, "
        f"{'--quick, ' if s.quick else ''}{s.reps} alternating repetitions "
        "(median, min-max in brackets).",
        "",
        *(f"- {line}" for line in environment()),
        *([f"- {baseline_line(s.baseline)}"] if s.baseline is not None else []),
        f"- popbox: `popbox serve`, pop3.workers = {s.popbox_workers}, uvloop, log level INFO; "
        "Dovecot: per-session (service_count = 1 for pop3 and pop3-login) and reuse "
        "(pop3 service_count = 100, pop3-login service_count = 0), both logging at info.",
        f"- users: one passwd file, {run.dataset.scheme} ({ds.HASH_ROUNDS} rounds) for both; "
        "the same self-signed P-256 certificate; each server its own copy of the Maildirs.",
        f"- sizes: login {sizes.login_users} users x {sizes.login_messages} messages; "
        f"retr {sizes.retr_users} mailboxes x {sizes.retr_messages} messages "
        f"({run.dataset.manifest('retr0').wire_octets / 1e6:.1f} MB each, 2-50 KB text/HTML "
        f"and 1-5 MB attachments); idle {sizes.idle_users} sessions; big maildrop "
        f"{sizes.bigbox_messages:,} messages of 1-4 KB; churn {sizes.churn_users} users "
        f"with {s.churn_rate:.0f} deliveries/s into each server's own LMTP (one message "
        "per transaction, MAIL/RCPT/DATA pipelined, up to 8 connections); every delivered "
        "message is checked to have been retrieved by a poll or to be left in the mailbox.",
        f"- durations: login {s.login_seconds:g} s, retr {s.retr_seconds:g} s, "
        f"churn {s.churn_seconds:g} s per figure and repetition.",
        *(f"- {note}" for note in run.notes),
        "",
        table,
        "",
        "![popbox vs Dovecot](chart.png)",
        "",
        "Load generator CPU next to the server's (seconds, median over repetitions; the "
        "machine's cores are shared by both):",
        "",
        cpu_table(run),
        *extra_sections,
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"samples": run.samples, "details": run.details, "notes": run.notes}, indent=1))
    return text


def cpu_table(run: Run) -> str:
    import statistics

    lines = ["| figure | server | server CPU s | load generator CPU s | wall s |",
             "|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for item in run.details:
        if item["figure"].endswith(".cpu"):
            continue
        groups.setdefault((item["figure"], item["server"]), []).append(item)
    for (figure, server), items in groups.items():
        def med(key: str, items: list[dict[str, Any]] = items) -> float:
            return statistics.median(float(item[key]) for item in items)
        lines.append(f"| {figure} | {server} | {med('server_cpu'):.2f} | "
                     f"{med('client_cpu'):.2f} | {med('wall'):.2f} |")
    return "\n".join(lines) + "\n"


def update_doc(report_text: str, profile_text: str | None, command: str) -> None:
    """Replace the generated blocks of docs/performance.md, keeping the prose around them."""
    doc = DOC.read_text() if DOC.exists() else ""
    block = (f"{BEGIN}\n_Generated by `{command}`; the chart is in bench/results/._\n\n"
             f"{report_text.replace('![popbox vs Dovecot](chart.png)', '')}\n{END}")
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        old_block, tail = rest.split(END, 1)
        if COLLECTOR_HEADING not in report_text and COLLECTOR_HEADING in old_block:
            # A run without the collector (it takes many minutes at 20 ms RTT) keeps the
            # last measured comparison, saying so, rather than dropping it from the page.
            kept = old_block.split(COLLECTOR_HEADING, 1)[1].strip()
            kept = kept.replace(KEPT_NOTE, "").strip()
            block = block.replace(
                f"\n{END}", f"\n{COLLECTOR_HEADING}\n\n{KEPT_NOTE}\n\n{kept}\n\n{END}"
            )
        doc = head + block + tail
    else:
        doc = doc + "\n## Latest results\n\n" + block + "\n"
    if profile_text is not None:
        pblock = f"{PROFILE_BEGIN}\n{profile_text}\n{PROFILE_END}"
        if PROFILE_BEGIN in doc and PROFILE_END in doc:
            head, rest = doc.split(PROFILE_BEGIN, 1)
            doc = head + pblock + rest.split(PROFILE_END, 1)[1]
        else:
            doc = doc + "\n## Profiles\n\n" + pblock + "\n"
    DOC.write_text(doc)


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, short durations")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (3)")
    parser.add_argument("--work", type=Path,
                        help="where data and server copies live (several GB for a full run; "
                        "default /var/tmp/popbox-bench, /var/tmp/popbox-bench-quick with "
                        "--quick so that a quick run does not replace the full data)")
    parser.add_argument("--idle", type=int, help="idle sessions (2000; 200 with --quick); "
                        "50,000 with popbox alone: python -m bench.idle")
    parser.add_argument("--bigbox", type=int, help="messages in the big maildrop (100000)")
    parser.add_argument("--collector-messages", type=int, help="collector mailbox (5000)")
    # Dovecot's processes spread over every core; popbox gets the same by default.
    parser.add_argument("--popbox-workers", type=int, default=os.cpu_count() or 1,
                        help="pop3.workers for popbox (default: the number of cores)")
    parser.add_argument("--only", help="comma-separated scenarios: login,pipeline,retr,churn,"
                        "idle,bigbox")
    parser.add_argument("--no-collector", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-doc", action="store_true",
                        help="leave docs/performance.md alone (trial runs while developing)")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of an earlier popbox commit (e.g. a git worktree) "
                        f"to measure in the same run as {BASELINE}")
    args = parser.parse_args(argv)
    if args.quick:
        sizes = ds.Sizes(retr_messages=60, idle_users=200, bigbox_messages=20_000,
                         collector_messages=500)
        durations = (1.0, 1.5, 2.0)
    else:
        sizes = ds.Sizes()
        durations = (3.0, 4.0, 6.0)
    overrides: dict[str, int] = {}
    if args.idle:
        overrides["idle_users"] = args.idle
    if args.bigbox:
        overrides["bigbox_messages"] = args.bigbox
    if args.collector_messages:
        overrides["collector_messages"] = args.collector_messages
    if overrides:
        sizes = ds.Sizes(**{**asdict(sizes), **overrides})
    return Settings(
        quick=args.quick, reps=args.reps,
        work=args.work or (QUICK_WORK if args.quick else FULL_WORK), sizes=sizes,
        login_seconds=durations[0], retr_seconds=durations[1], churn_seconds=durations[2],
        churn_rate=50.0, popbox_workers=args.popbox_workers,
        only=set(args.only.split(",")) if args.only else None,
        collector=not args.no_collector, profile=not args.no_profile,
        doc=not args.no_doc,
        baseline=args.baseline.resolve() if args.baseline else None,
    )


def main(argv: list[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("bench.run must run as root: Dovecot switches users, caches are dropped",
              file=sys.stderr)
        return 2
    settings = parse_args(argv)
    command = "python -m bench.run" + (" --quick" if settings.quick else "")
    raise_fd_limit(4 * settings.sizes.idle_users + 4096)
    started = time.time()
    out = RESULTS / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    settings.work.mkdir(parents=True, exist_ok=True)
    print(f"data under {settings.work}, results in {out}", flush=True)
    dataset = ds.build(settings.work, settings.sizes)
    print("installing a copy of the mail for each server", flush=True)
    ds.install(dataset, settings.work / "popbox", owner=None)
    if settings.baseline is not None:
        ds.install(dataset, settings.work / BASELINE, owner=None)
    ds.install(dataset, settings.work / "dovecot", owner=servers.mail_ids(),
               collector=settings.collector)
    run = Run(settings, dataset)
    cores = os.cpu_count() or 1
    if settings.popbox_workers < cores:
        run.note(f"popbox ran {settings.popbox_workers} process(es) (pop3.workers) on "
                 f"{cores} cores; Dovecot's processes use every core")
    run.run_servers()
    sections: list[str] = []
    if settings.collector:
        from bench import collector

        print("collector comparison", flush=True)
        sections.append(collector.run_comparison(dataset, settings.work, quick=settings.quick,
                                                 baseline=settings.baseline))
    profile_text = None
    if settings.profile:
        from bench import profile

        print("profiles", flush=True)
        profile_text = profile.run_profiles(dataset, settings.work, out / "profiles",
                                            quick=settings.quick)
    text = write_report(run, out, started, sections)
    latest = RESULTS / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(out.name)
    shutil.copy(out / "report.md", RESULTS / "latest.md")
    if settings.doc:
        update_doc(text, profile_text, command)
        print(f"report: {out / 'report.md'}; docs/performance.md updated", flush=True)
    else:
        print(f"report: {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
