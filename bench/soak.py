"""Soak: hold 1,000 concurrent POP3 sessions against a real `popbox serve` on loopback.

    .venv/bin/python bench/soak.py [--duration 180] [--sessions 1000]

The mix: idle logged-in sessions (a NOOP a minute), STAT/LIST/UIDL loops, RETR loops,
and login/logout churn, each session on its own maildrop (the lock is exclusive). It
reports errors (must be zero) and the server's RSS sampled over time (must be flat
after warm-up) and writes a JSON and a Markdown report to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PASSWORD = "soak-password"
# Bounded so a forgotten run ends: half an hour at most.
MAX_DURATION = 1800.0
# RSS may move this much between the first sample after warm-up and the last.
FLAT_TOLERANCE = 0.10
MIX = (("idle", 0.40), ("listing", 0.30), ("retr", 0.15), ("churn", 0.15))


@dataclass
class Stats:
    commands: int = 0
    logins: int = 0
    retrieved_octets: int = 0
    errors: list[str] = field(default_factory=list)
    connected: int = 0


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def login(cls, port: int, user: str, stats: Stats) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        await client.expect_ok()
        await client.command(f"USER {user}", stats)
        await client.command(f"PASS {PASSWORD}", stats)
        stats.logins += 1
        return client

    async def expect_ok(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), 60)
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"unexpected reply {line[:80]!r}")
        return line

    async def command(self, line: str, stats: Stats, multiline: bool = False) -> bytes:
        self.writer.write(line.encode() + b"\r\n")
        status = await self.expect_ok()
        stats.commands += 1
        if not multiline:
            return status
        body = await asyncio.wait_for(self.reader.readuntil(b"\r\n.\r\n"), 60)
        return body

    async def quit(self, stats: Stats) -> None:
        await self.command("QUIT", stats)
        self.writer.close()


async def session(kind: str, port: int, user: str, stats: Stats, stop: asyncio.Event) -> None:
    rng = random.Random(user)
    try:
        client = await Client.login(port, user, stats)
        stats.connected += 1
        while not stop.is_set():
            if kind == "idle":
                with_timeout = asyncio.wait_for(stop.wait(), 60)
                try:
                    await with_timeout
                except TimeoutError:
                    await client.command("NOOP", stats)
                continue
            if kind == "listing":
                await client.command("STAT", stats)
                await client.command("LIST", stats, multiline=True)
                await client.command("UIDL", stats, multiline=True)
            elif kind == "retr":
                body = await client.command(f"RETR {rng.randint(1, 3)}", stats, multiline=True)
                stats.retrieved_octets += len(body)
            elif kind == "churn":
                await client.command("STAT", stats)
                await client.quit(stats)
                stats.connected -= 1
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                client = await Client.login(port, user, stats)
                stats.connected += 1
                continue
            await asyncio.sleep(rng.uniform(0.5, 1.5))
        await client.quit(stats)
        stats.connected -= 1
    except Exception as exc:
        stats.errors.append(f"{kind} {user}: {type(exc).__name__}: {exc}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def prepare(directory: Path, sessions: int) -> tuple[Path, int]:
    """Users with PLAIN passwords (the bench measures the server, not argon2) and mail."""
    sys.path.insert(0, str(ROOT / "src"))
    from popbox.store.maildir import MaildirStore

    users = [f"soak{n:04d}" for n in range(sessions)]
    passwd = directory / "passwd"
    passwd.write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::::\n" for u in users))
    passwd.chmod(0o600)

    async def fill() -> None:
        store = MaildirStore(directory / "mail")
        rng = random.Random(1)
        for user in users:
            for n in range(3):
                size = rng.randint(2_000, 40_000)
                await store.deliver(user, f"Subject: soak {n}\n\n".encode() + b"z" * size + b"\n")
        await store.close()

    asyncio.run(fill())
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = directory / "popbox.toml"
    config.write_text(
        f'data_dir = "{directory}"\n'
        f'[pop3]\nlisten = ["127.0.0.1:{port}"]\ntls_listen = []\nplaintext_auth = "always"\n'
        "[lmtp]\nenabled = false\n"
        "[limits]\nmax_connections_per_ip = 100000\nmax_login_sessions = 100000\n"
        "shutdown_grace = 2\n"
    )
    config.chmod(0o600)
    return config, port


async def run(args: argparse.Namespace, pid: int, port: int) -> dict[str, object]:
    stats = Stats()
    stop = asyncio.Event()
    kinds = [kind for kind, share in MIX for _ in range(round(share * args.sessions))]
    tasks = []
    for n, kind in enumerate(kinds[: args.sessions]):
        tasks.append(asyncio.create_task(session(kind, port, f"soak{n:04d}", stats, stop)))
        if n % 50 == 49:
            await asyncio.sleep(0.05)  # ramp up rather than a SYN flood
    started = time.monotonic()
    samples: list[tuple[float, int, int]] = []
    while time.monotonic() - started < args.duration:
        samples.append((round(time.monotonic() - started, 1), rss_kib(pid), stats.connected))
        print(f"t={samples[-1][0]:6.1f}s rss={samples[-1][1] / 1024:7.1f} MiB "
              f"sessions={stats.connected} commands={stats.commands} errors={len(stats.errors)}",
              flush=True)
        await asyncio.sleep(args.sample_every)
    stop.set()
    await asyncio.gather(*tasks)
    warm = [s for s in samples if s[0] >= args.warmup] or samples
    first, last = warm[0][1], warm[-1][1]
    peak = max(s[1] for s in warm)
    growth = (last - first) / first if first else 0.0
    return {
        "sessions": args.sessions,
        "duration_s": args.duration,
        "mix": dict(MIX),
        "commands": stats.commands,
        "logins": stats.logins,
        "retrieved_octets": stats.retrieved_octets,
        "errors": len(stats.errors),
        "first_errors": stats.errors[:20],
        "max_concurrent_sessions": max(s[2] for s in samples),
        "rss_kib_after_warmup": first,
        "rss_kib_last": last,
        "rss_kib_peak": peak,
        "rss_growth": round(growth, 4),
        "flat": abs(growth) <= FLAT_TOLERANCE,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--sample-every", type=float, default=5.0)
    args = parser.parse_args()
    args.duration = min(args.duration, MAX_DURATION)
    # Two sockets a session in this process and one in the server, plus files.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.sessions * 2 + 100:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} is too low for {args.sessions} sessions")
    with tempfile.TemporaryDirectory(prefix="popbox-soak-") as tmp:
        directory = Path(tmp)
        config, port = prepare(directory, args.sessions)
        log = (directory / "serve.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "popbox", "serve", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    __import__("socket").create_connection(("127.0.0.1", port), 1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            report = asyncio.run(run(args, server.pid, port))
        finally:
            server.terminate()
            server.wait(30)
        server_errors = [
            line for line in (directory / "serve.log").read_text().splitlines()
            if " ERROR " in line or "Traceback" in line
        ]
    report["server_log_errors"] = server_errors[:20]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"soak-{stamp}.json").write_text(json.dumps(report, indent=2))
    verdict = "PASS" if report["errors"] == 0 and report["flat"] and not server_errors else "FAIL"
    summary = (
        f"# soak {stamp}: {verdict}\n\n"
        f"- sessions held: {report['max_concurrent_sessions']} (target {args.sessions}), "
        f"duration {args.duration:.0f} s\n"
        f"- commands: {report['commands']}, logins: {report['logins']}, "
        f"retrieved: {report['retrieved_octets'] / 1e6:.1f} MB\n"
        f"- client errors: {report['errors']}, server log errors: {len(server_errors)}\n"
        f"- server RSS after warm-up {report['rss_kib_after_warmup'] / 1024:.1f} MiB, "
        f"last {report['rss_kib_last'] / 1024:.1f} MiB, peak {report['rss_kib_peak'] / 1024:.1f} "
        f"MiB, growth {report['rss_growth']:+.1%}\n"
    )
    (RESULTS / f"soak-{stamp}.md").write_text(summary)
    print(summary)
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
