"""Where popbox's time goes: py-spy samples of the server under retr, login and bigbox.

popbox runs with one worker so that one process holds every sample. py-spy records
raw (collapsed) stacks at 200 Hz while a scenario runs; idle samples (the event loop
waiting in epoll) are left out by py-spy, so percentages are of busy time. The summary
lists the functions with the most *own* samples (the leaf of the stack) and the
popbox functions with the most *inclusive* samples (anywhere on the stack).

    .venv/bin/python -m bench.profile    # as root, after a bench.run built the data
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from bench import dataset as ds
from bench import loadgen, servers

__all__ = ["run_profiles", "summarise"]

PY_SPY: Final = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
RATE: Final = 200
TOP: Final = 12
_FRAME: Final = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``file.py:func`` (line numbers merged)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    if "/popbox/" in path or path.startswith("popbox/"):
        short = "popbox/" + path.split("popbox/", 1)[1]
    else:
        short = "/".join(path.split("/")[-2:])
    return f"{short}:{match.group('func')}"


def summarise(raw: Path) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Total samples, top own-time functions, top inclusive popbox functions."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")]
        # py-spy puts the thread as the first "frame"; it is not a function.
        frames = [frame for frame in frames if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            # The entry points are on every stack and say nothing.
            if name.startswith("popbox/") and not name.startswith(("popbox/app.py",
                                                                   "popbox/cli.py")):
                inclusive[name] += count
    return total, own.most_common(TOP), inclusive.most_common(TOP)


def _markdown(title: str, raw: Path, seconds: float) -> str:
    total, own, inclusive = summarise(raw)
    if not total:
        return f"### {title}\n\nno samples (py-spy failed? see {raw})\n"
    lines = [f"### {title}", "",
             f"{total} busy samples in {seconds:.0f} s at {RATE} Hz "
             f"(= {total / RATE / seconds:.0%} of one core busy in Python-visible code).", "",
             "| own time | function |", "|---|---|"]
    lines += [f"| {count / total:.1%} | `{name}` |" for name, count in own]
    lines += ["", "| inclusive | popbox function |", "|---|---|"]
    lines += [f"| {count / total:.1%} | `{name}` |" for name, count in inclusive]
    return "\n".join(lines) + "\n"


def _record(pid: int, out: Path, work: Callable[[], Awaitable[None]]) -> float:
    """Sample ``pid`` while ``work`` runs; return the seconds it ran."""
    spy = subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    time.sleep(1.0)  # py-spy attaches before the load starts
    start = time.perf_counter()
    try:
        import uvloop

        uvloop.run(work())  # type: ignore[arg-type]
    finally:
        elapsed = time.perf_counter() - start
        # SIGINT makes py-spy write what it has and exit.
        os.killpg(spy.pid, signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(spy.pid, signal.SIGKILL)
            spy.wait()
    return elapsed


def run_profiles(dataset: ds.Dataset, work: Path, out: Path, *, quick: bool = False) -> str:
    """Profile a fresh popbox under each scenario; return the Markdown summary."""
    out.mkdir(parents=True, exist_ok=True)
    seconds = 4.0 if quick else 10.0
    tls = loadgen.client_tls_context(dataset.cert)
    ds.install(dataset, work / "popbox-profile", owner=None)
    server = servers.start_popbox(work / "popbox-profile", dataset.cert, dataset.key)
    sections: list[str] = []
    try:
        pid = server.process.pid
        manifests = {user: dataset.retr_manifest(user) for user in dataset.retr_users()}

        async def retr_plain() -> None:
            await loadgen.retr_throughput(server, dataset.retr_users(), manifests, ds.PASSWORD,
                                          clients=4, security="plain", tls=tls,
                                          duration=seconds)

        async def retr_tls() -> None:
            await loadgen.retr_throughput(server, dataset.retr_users(), manifests, ds.PASSWORD,
                                          clients=4, security="tls", tls=tls, duration=seconds)

        async def login_plain() -> None:
            await loadgen.login_rate(server, dataset.login_users(), ds.PASSWORD, clients=20,
                                     security="plain", tls=tls, duration=seconds)

        async def login_tls() -> None:
            await loadgen.login_rate(server, dataset.login_users(), ds.PASSWORD, clients=20,
                                     security="tls", tls=tls, duration=seconds,
                                     mechanism="plain")

        count = dataset.sizes.bigbox_messages

        async def first_logins() -> None:
            # The first login after the files were written moves 100,000 files from
            # new/ to cur/; it is neither cold nor warm, so it stays out of the samples.
            for user in dataset.bigbox_users:
                await loadgen.bigbox_login(server, user, ds.PASSWORD, count)

        async def bigbox_cold() -> None:
            user = dataset.bigbox_users[1]
            for _ in range(2):
                server.forget_index(user)
                servers.drop_caches()
                await loadgen.bigbox_login(server, user, ds.PASSWORD, count)

        async def bigbox_warm() -> None:
            user = dataset.bigbox_users[0]
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline:
                await loadgen.bigbox_login(server, user, ds.PASSWORD, count)

        plan: list[tuple[str, str, Callable[[], Awaitable[None]]]] = [
            ("retr-plain", "RETR, plain, 4 clients", retr_plain),
            ("retr-tls", "RETR, implicit TLS, 4 clients", retr_tls),
            ("login-plain", "login, plain USER/PASS, 20 clients", login_plain),
            ("login-tls", "login, implicit TLS, 20 clients", login_tls),
            ("bigbox-cold", "big maildrop without sizes, cold logins (index deleted, "
             "caches dropped)", bigbox_cold),
            ("bigbox-warm", "big maildrop with sizes, warm logins", bigbox_warm),
        ]
        import uvloop

        uvloop.run(first_logins())
        for name, title, work_fn in plan:
            raw = out / f"{name}.txt"
            elapsed = _record(pid, raw, work_fn)
            sections.append(_markdown(title, raw, elapsed))
            print(f"    profiled {name} ({elapsed:.0f} s)", flush=True)
    finally:
        server.stop()
    head = (f"_py-spy {RATE} Hz raw stacks of `popbox serve` (one worker) under load from "
            "bench.loadgen; generated by `python -m bench.run`, raw files in "
            "bench/results/<run>/profiles/._\n")
    return head + "\n" + "\n".join(sections)


def main() -> None:
    work = Path("/var/tmp/popbox-bench")
    dataset = ds.build(work, ds.Sizes())
    out = Path(__file__).resolve().parent / "results" / "profiles"
    print(run_profiles(dataset, work, out))


if __name__ == "__main__":
    main()
