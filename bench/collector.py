"""The collector comparison: `popbox fetch` vs fetchmail, getmail6 and mpop.

All four download the same mailbox (5,000 messages by default, the realistic mix
without multi-megabyte attachments) from the same server — Dovecot in its reuse
shape, so the server is neither popbox nor a variable — over plain POP3 with
USER/PASS on loopback, into a fresh Maildir each time, keeping the mail on the server.
Delivery is durable where the client offers it: popbox's Maildir sink fsyncs each file
and, once per batch, the directory, and records the batch in its state before any DELE;
fetchmail hands each message to an MDA script that writes tmp/, syncs the file and
renames into new/ (fetchmail has no Maildir delivery of its own); getmail6 and mpop use
their built-in Maildir delivery (mpop, per strace: fsync of each file, link into new/,
no directory fsync, its UIDL list written once at the end of the session). Run once
directly and once through bench.latency_proxy with 10 ms each way (20 ms round trip).

    .venv/bin/python -m bench.collector [--messages 5000] [--reps 1]   # alone, as root
    .venv/bin/python -m bench.collector --clients "popbox fetch,mpop" --links loopback
    .venv/bin/python -m bench.collector --baseline /path/to/older/checkout   # old vs new
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench import dataset as ds
from bench import servers

__all__ = ["run_comparison", "start_proxy"]

CLIENTS: Final = ("popbox fetch", "mpop", "getmail6", "fetchmail")
# A client that has not finished in this time is stuck; the figure is reported missing.
CLIENT_TIMEOUT: Final = 1800.0
POPBOX: Final = str(Path(sys.executable).with_name("popbox"))
# `popbox fetch` of an earlier commit (--baseline), measured in the same run.
BASELINE_CLIENT: Final = "popbox fetch@base"


def _count(maildir: Path) -> int:
    return sum(1 for sub in ("new", "cur") if (maildir / sub).exists()
               for _ in (maildir / sub).iterdir())


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def _popbox(base: Path, port: int, user: str, password: str, dest: Path) -> list[str]:
    (base / "password").write_text(password + "\n")
    config = base / "fetch.toml"
    config.write_text(f"""[fetch]
state_dir = "{base / 'state'}"

[[fetch.accounts]]
name = "bench"
host = "127.0.0.1"
port = {port}
security = "none"
allow_plaintext_password = true
username = "{user}"
password_file = "{base / 'password'}"
delete = "keep"

[[fetch.accounts.sinks]]
kind = "maildir"
path = "{dest}"
""")
    return [POPBOX, "fetch", "--config", str(config)]


def _popbox_base(base: Path, port: int, user: str, password: str, dest: Path) -> list[str]:
    """The same run by another checkout's popbox (PYTHONPATH names its src/)."""
    command = _popbox(base, port, user, password, dest)
    return [sys.executable, "-m", "popbox", *command[1:]]


def _mpop(base: Path, port: int, user: str, password: str, dest: Path) -> list[str]:
    config = base / "mpoprc"
    config.write_text(f"""defaults
tls off
account bench
host 127.0.0.1
port {port}
user {user}
auth user
password {password}
delivery maildir {dest}
keep on
uidls_file {base / 'uidls'}
""")
    config.chmod(0o600)
    return ["mpop", "-C", str(config), "--quiet", "bench"]


def _getmail(base: Path, port: int, user: str, password: str, dest: Path) -> list[str]:
    config = base / "getmailrc"
    config.write_text(f"""[retriever]
type = SimplePOP3Retriever
server = 127.0.0.1
port = {port}
username = {user}
password = {password}

[destination]
type = Maildir
path = {dest}/

[options]
read_all = true
delete = false
verbose = 0
""")
    return ["getmail", "--getmaildir", str(base), "--rcfile", str(config)]


def _fetchmail(base: Path, port: int, user: str, password: str, dest: Path) -> list[str]:
    mda = base / "maildir-mda.sh"
    # What procmail or maildrop would do for a Maildir, without either installed:
    # write into tmp/, make the file durable, rename it into new/.
    mda.write_text(f"""#!/bin/sh
set -e
f=$(mktemp -p {dest}/tmp fetchmail.XXXXXXXXXX)
cat > "$f"
sync "$f"
mv "$f" {dest}/new/
""")
    mda.chmod(0o755)
    config = base / "fetchmailrc"
    config.write_text(f"""set no syslog
poll 127.0.0.1 service {port} protocol pop3 auth password:
  user "{user}" password "{password}" is root here
  keep fetchall sslproto '' mda "{mda}"
""")
    config.chmod(0o600)
    return ["fetchmail", "-f", str(config), "--idfile", str(base / "fetchids"), "--nosyslog"]


BUILDERS: Final[dict[str, Callable[[Path, int, str, str, Path], list[str]]]] = {
    "popbox fetch": _popbox,
    BASELINE_CLIENT: _popbox_base,
    "mpop": _mpop,
    "getmail6": _getmail,
    "fetchmail": _fetchmail,
}


def start_proxy(target: int, delay_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = servers.free_port()
    repo = Path(__file__).resolve().parent.parent
    proxy = subprocess.Popen(
        [sys.executable, "-m", "bench.latency_proxy", "--listen", f"127.0.0.1:{port}",
         "--target", f"127.0.0.1:{target}", "--delay-ms", str(delay_ms)],
        cwd=repo, start_new_session=True, stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proxy, port
        except OSError:
            time.sleep(0.1)
    os.killpg(proxy.pid, signal.SIGKILL)
    raise RuntimeError("the latency proxy did not start")


def measure(client: str, base: Path, port: int, user: str, expected: int,
            baseline: Path | None = None) -> tuple[float, str]:
    """Seconds for one full download by ``client`` into a new directory ``base``.

    The second item is a problem or "". Every run gets a directory of its own and the
    runs' trees are deleted only after the last one: on ext4, creating a file scans
    past the inodes deleted in the last minute, so deleting 5,000 messages just before
    a run made that run pay for it (seconds of kernel time, by chance of order). The
    disk is synced first, so no run pays for the previous one's writeback either.
    """
    base = _fresh(base)
    os.sync()
    for path in [base, *base.parents]:
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o711)
    dest = _maildir(base / "Maildir")
    command = BUILDERS[client](base, port, user, ds.PASSWORD, dest)
    env = {**os.environ, "HOME": str(base), "FETCHMAILHOME": str(base)}
    if client == BASELINE_CLIENT:
        if baseline is None:
            raise ValueError(f"{BASELINE_CLIENT} needs a baseline checkout")
        env["PYTHONPATH"] = str(baseline / "src")
    # getmail refuses to deliver as root, so it runs as the mail user; the others stay
    # root (popbox's virtualenv lives under /root here, out of other users' reach).
    uid = gid = -1
    if client == "getmail6":
        uid, gid = servers.mail_ids()
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(base)], check=True)
    start = time.perf_counter()
    with (base / "output.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=base, start_new_session=True,
                                   user=uid if uid >= 0 else None,
                                   group=gid if gid >= 0 else None,
                                   extra_groups=[] if uid >= 0 else None)
        try:
            process.wait(CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return float("nan"), f"timed out after {CLIENT_TIMEOUT:.0f} s"
    elapsed = time.perf_counter() - start
    got = _count(dest)
    if got != expected:
        tail = (base / "output.log").read_text(errors="replace")[-400:]
        return elapsed, f"delivered {got} of {expected} (exit {process.returncode}): {tail!r}"
    return elapsed, ""


LINKS: Final = ("loopback", "20 ms RTT")


def run_comparison(dataset: ds.Dataset, work: Path, *, quick: bool = False,
                   reps: int | None = None, clients: tuple[str, ...] = CLIENTS,
                   links: tuple[str, ...] = LINKS, baseline: Path | None = None) -> str:
    """Run every client on loopback and at 20 ms RTT; return a Markdown section.

    ``clients`` and ``links`` narrow the run (a quick loop while working on one client);
    ``baseline``, a checkout of an earlier popbox, adds its `popbox fetch` as a client.
    """
    if baseline is not None and BASELINE_CLIENT not in clients:
        clients = (*clients, BASELINE_CLIENT)
    user = dataset.collector_user
    manifest = dataset.manifest(user)
    expected = len(manifest.hashes)
    megabytes = manifest.wire_octets / 1e6
    # One run per client and link by default: fetchmail and getmail at 20 ms RTT take
    # minutes for 5,000 messages, and their gap to a pipelining client is not subtle.
    reps = reps or 1
    server = servers.start_dovecot(work / "dovecot", "dovecot-reuse", dataset.cert, dataset.key,
                                   sessions=100)
    times: dict[tuple[str, str], list[float]] = {}
    problems: list[str] = []
    proxy: subprocess.Popen[bytes] | None = None
    runs = work / "collector"
    if runs.exists():  # a run that was cut short
        shutil.rmtree(runs)
    count = 0
    try:
        proxy, proxy_port = start_proxy(server.pop3_port, 10.0)
        for rep in range(reps):
            for link, port in (("loopback", server.pop3_port), ("20 ms RTT", proxy_port)):
                if link not in links:
                    continue
                order = clients[rep % len(clients):] + clients[: rep % len(clients)]
                for client in order:
                    count += 1
                    base = runs / f"{count:03d}-{client.replace(' ', '-')}"
                    elapsed, problem = measure(client, base, port, user, expected,
                                               baseline)
                    print(f"    {client:14s} {link:10s} {elapsed:8.2f} s {problem}", flush=True)
                    if problem:
                        problems.append(f"{client} ({link}): {problem}")
                    else:
                        times.setdefault((client, link), []).append(elapsed)
    finally:
        if proxy is not None:
            os.killpg(proxy.pid, signal.SIGKILL)
            proxy.wait()
        server.stop()
        shutil.rmtree(runs, ignore_errors=True)
    lines = [
        "",
        "## Collector",
        "",
        f"{expected:,} messages ({megabytes:.0f} MB on the wire) from Dovecot (reuse shape) "
        f"over plain POP3, into a fresh Maildir, keeping mail on the server; median of "
        f"{reps} run(s) per client and link, alternating clients. 20 ms RTT = "
        "bench.latency_proxy delaying each direction by 10 ms.",
        "",
        "| client | link | seconds | messages/s | MB/s | popbox fetch advantage (x) |",
        "|---|---|---|---|---|---|",
    ]
    for link in links:
        ours = times.get(("popbox fetch", link))
        for client in clients:
            samples = times.get((client, link))
            if not samples:
                lines.append(f"| {client} | {link} | — | — | — | — |")
                continue
            seconds = statistics.median(samples)
            advantage = (f"{seconds / statistics.median(ours):.2f}"
                         if ours and client != "popbox fetch" else "—")
            lines.append(f"| {client} | {link} | {seconds:.1f} | {expected / seconds:,.0f} | "
                         f"{megabytes / seconds:.1f} | {advantage} |")
    targets = [("mpop", "loopback", 2.0), ("fetchmail", "20 ms RTT", 5.0),
               ("getmail6", "20 ms RTT", 5.0)]
    lines += ["", "Targets (messages/s ratio popbox fetch / other):", ""]
    for client, link, goal in targets:
        ours, theirs = times.get(("popbox fetch", link)), times.get((client, link))
        if not ours or not theirs:
            lines.append(f"- vs {client} on {link}: not measured")
            continue
        ratio = statistics.median(theirs) / statistics.median(ours)
        verdict = "**met**" if ratio >= goal else "not met"
        lines.append(f"- vs {client} on {link}: {ratio:.2f}x (target >= {goal:g}x): {verdict}")
    if problems:
        lines += ["", "Problems:", "", *(f"- {problem}" for problem in problems)]
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/popbox-bench-collector"))
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help="comma-separated subset of: " + ", ".join(CLIENTS))
    parser.add_argument("--links", default=",".join(LINKS),
                        help="comma-separated subset of: " + ", ".join(LINKS))
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of an earlier popbox commit to run beside this one")
    args = parser.parse_args()
    clients = tuple(c.strip() for c in args.clients.split(",") if c.strip())
    links = tuple(link.strip() for link in args.links.split(",") if link.strip())
    unknown = [c for c in clients if c not in CLIENTS] + [k for k in links if k not in LINKS]
    if unknown or not clients or not links:
        parser.error(f"unknown or empty --clients/--links: {unknown}")
    # Only the collector's mailbox matters here; the other users are token-sized.
    sizes = ds.Sizes(login_users=1, login_messages=1, retr_users=1, retr_messages=1,
                     churn_users=1, churn_messages=1, idle_users=1, bigbox_messages=10,
                     collector_messages=args.messages)
    dataset = ds.build(args.work, sizes)
    ds.install(dataset, args.work / "dovecot", owner=servers.mail_ids(), collector=True)
    print(run_comparison(dataset, args.work, reps=args.reps, clients=clients, links=links,
                         baseline=args.baseline.resolve() if args.baseline else None))


if __name__ == "__main__":
    main()
