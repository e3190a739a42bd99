"""What devices cost a POP3 poll: one big mailbox read by one device, against the same
mailbox read by ten devices that have each deleted mail of their own.

    .venv/bin/python -m bench.devices [--messages 100000] [--devices 10] [--reps 9]

Builds two Maildirs of N messages (as an MTA writes them, with S=/W= sizes), starts a
real ``popbox serve`` (one worker, PLAIN passwords so the figure is the server's and
not the hash's), lets each of the ten devices of the second mailbox delete 1,000
messages of its own (half in a run, half scattered: the worst case for the ranges the
state keeps), then times login + UIDL + QUIT on the single-device mailbox, then on the
ten devices in turn, warm (the worker has seen every device before) and
cold (a freshly started server, first login of each). Server CPU is the worker's
utime+stime over the repetitions, per login. Last, idle memory: the server's RSS with
200 sessions held on small mailboxes, logged in without and then with device names.
Prints a Markdown report; results are reports, not tests.
"""

from __future__ import annotations

import argparse
import os
import poplib
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.maildir_index import build

DEFAULT_WORK: Final = Path("/var/tmp/popbox-bench-devices")
PASSWORD: Final = "bench"
# Messages each device deletes before the timing: enough that its view is not the
# whole mailbox, few enough that the mailbox stays at about N messages.
DELETED_PER_DEVICE: Final = 1000
IDLE_SESSIONS: Final = 200
TICK: Final = os.sysconf("SC_CLK_TCK")


def write_config(work: Path, users: list[str], port: int) -> Path:
    passwd = work / "passwd"
    passwd.write_text("".join(f"{user}:{{PLAIN}}{PASSWORD}::::::\n" for user in users))
    passwd.chmod(0o600)
    config = work / "popbox.toml"
    config.write_text(
        f'data_dir = "{work}"\n'
        f'[pop3]\nlisten = ["127.0.0.1:{port}"]\ntls_listen = []\nplaintext_auth = "always"\n'
        "[lmtp]\nenabled = false\n"
        "[limits]\nauth_failure_delay = 0\nmax_connections_per_ip = 1000\n"
        "max_sessions_per_user = 1000\n"
    )
    config.chmod(0o600)
    return config


class Server:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "popbox", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                    if sock.recv(100).startswith(b"+OK"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("popbox serve did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def login(port: int, user: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=120)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def poll(port: int, user: str) -> int:
    """Login, UIDL, QUIT: what a client that leaves mail on the server does each time."""
    client = login(port, user)
    count = len(client.uidl()[1])
    client.quit()
    return count


def delete_own(port: int, user: str, count: int, rng: random.Random) -> None:
    client = login(port, user)
    total = len(client.uidl()[1])
    start = rng.randrange(1, total - count)
    numbers = set(range(start, start + count // 2))
    while len(numbers) < count:
        numbers.add(rng.randrange(1, total + 1))
    for number in sorted(numbers):
        client.dele(number)
    client.quit()


def timed(server: Server, action: Callable[[], object]) -> tuple[float, float]:
    cpu = server.cpu_seconds()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, server.cpu_seconds() - cpu


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.0f} ms"


def idle_rss(server: Server, users: list[str]) -> float:
    """KiB of server RSS per held session, logged in as ``users``."""
    before = server.rss_kib()
    clients = [login(server.port, user) for user in users]
    for client in clients:
        client.stat()
    loaded = server.rss_kib()
    for client in clients:
        client.quit()
    return (loaded - before) / len(users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--dir", type=Path, default=DEFAULT_WORK)
    args = parser.parse_args()
    work: Path = args.dir
    shutil.rmtree(work, ignore_errors=True)
    (work / "mail").mkdir(parents=True)
    idle_users = [f"idle{n}" for n in range(IDLE_SESSIONS)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(work, ["solo", "family", *idle_users], port)
    for user in ("solo", "family"):
        build(work / "mail" / user, args.messages, with_sizes=True)
    devices = [f"family~d{n}" for n in range(args.devices)]
    server = Server(config, port)
    server.start()
    rng = random.Random(2449)
    try:
        poll(port, "solo")
        for device in devices:
            delete_own(port, device, DELETED_PER_DEVICE, rng)
        # One mailbox at a time: a worker's index cache holds one 100,000-message
        # index, and alternating two would time the parse of the index file instead.
        poll(port, "solo")
        solo: list[float] = []
        solo_cpu = 0.0
        for _ in range(args.reps):
            elapsed, cpu = timed(server, lambda: poll(port, "solo"))
            solo.append(elapsed)
            solo_cpu += cpu
        solo_rss = server.rss_kib()
        for device in devices:
            poll(port, device)  # every view built once in this worker
        family: list[float] = []
        family_cpu = 0.0
        for rep in range(args.reps):
            device = devices[rep % len(devices)]
            elapsed, cpu = timed(server, lambda device=device: poll(port, device))  # type: ignore[misc]
            family.append(elapsed)
            family_cpu += cpu
        family_rss = server.rss_kib()
        server.stop()
        server.start()
        cold_solo = timed(server, lambda: poll(port, "solo"))[0]
        cold_family = timed(server, lambda: poll(port, devices[0]))[0]
        second_device = timed(server, lambda: poll(port, devices[1]))[0]
        plain_idle = idle_rss(server, idle_users)
        device_idle = idle_rss(server, [f"{user}~phone" for user in idle_users])
    finally:
        server.stop()
    reps = args.reps
    print(f"## Devices: {args.messages:,} messages, {args.devices} devices\n")
    print("| figure | one device | ten devices | ratio |")
    print("|---|---|---|---|")
    print(
        f"| warm login + UIDL + QUIT, median | {median_ms(solo)} | {median_ms(family)} | "
        f"{statistics.median(family) / statistics.median(solo):.2f}x |"
    )
    print(
        f"| server CPU per warm poll | {solo_cpu / reps * 1000:.0f} ms | "
        f"{family_cpu / reps * 1000:.0f} ms | {family_cpu / max(solo_cpu, 1e-9):.2f}x |"
    )
    print(
        f"| cold poll (fresh server) | {cold_solo * 1000:.0f} ms | {cold_family * 1000:.0f} ms "
        f"(next device {second_device * 1000:.0f} ms) | {cold_family / cold_solo:.2f}x |"
    )
    print(
        f"| worker RSS after the warm polls | {solo_rss / 1024:.0f} MiB | "
        f"{family_rss / 1024:.0f} MiB | {family_rss / solo_rss:.2f}x |"
    )
    print(
        f"| idle RSS per session, {IDLE_SESSIONS} sessions | {plain_idle:.1f} KiB | "
        f"{device_idle:.1f} KiB (as `user~phone`) | {device_idle / max(plain_idle, 1e-9):.2f}x |"
    )


if __name__ == "__main__":
    main()
