"""Can a client tell an unknown user from a wrong password by timing? A statistical test.

    .venv/bin/python bench/timing_enumeration.py [--samples 300] [--scheme ARGON2ID]

Starts a real `popbox serve` on loopback with one user whose password is hashed with
the default scheme, then alternates USER known/PASS wrong and USER unknown/PASS wrong
on one connection, timing PASS -> -ERR. The auth failure delay and the per-IP penalty
are switched off (they are constant and would only hide the hash). It reports the
medians and a two-sided Mann-Whitney U test; p above 0.01 means no detectable
difference. A report goes to bench/results/. Not a unit test: it measures time.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KNOWN = "alice"
# ALPHA for the verdict: 1% keeps false alarms rare over repeated runs.
ALPHA = 0.01


def mann_whitney_u(a: list[float], b: list[float]) -> tuple[float, float]:
    """U statistic and two-sided p-value (normal approximation, tie-corrected)."""
    pooled = sorted([(x, 0) for x in a] + [(x, 1) for x in b])
    ranks = [0.0] * len(pooled)
    tie_term = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = rank
        ties = j - i + 1
        tie_term += ties**3 - ties
        i = j + 1
    n1, n2 = len(a), len(b)
    r1 = sum(rank for rank, (_, group) in zip(ranks, pooled, strict=True) if group == 0)
    u1 = r1 - n1 * (n1 + 1) / 2
    mean = n1 * n2 / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    z = (u1 - mean) / math.sqrt(variance) if variance > 0 else 0.0
    p = math.erfc(abs(z) / math.sqrt(2))
    return u1, p


def start_server(directory: Path, scheme: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = directory / "popbox.toml"
    config.write_text(
        f'data_dir = "{directory}"\n'
        f'[pop3]\nlisten = ["127.0.0.1:{port}"]\ntls_listen = []\nplaintext_auth = "always"\n'
        f'[auth]\ndefault_scheme = "{scheme}"\n'
        "[lmtp]\nenabled = false\n"
        "[limits]\nauth_failure_delay = 0\nauth_penalty_max = 0\nmax_auth_failures = 100000\n"
    )
    config.chmod(0o600)
    popbox = [sys.executable, "-m", "popbox"]
    subprocess.run(
        [*popbox, "user", "add", "--config", str(config), "--password-stdin", KNOWN],
        input=b"the right one\n", check=True, capture_output=True,
    )
    server = subprocess.Popen(
        [*popbox, "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    sys.exit("popbox serve did not start")


def attempt(sock: socket.socket, reader: socket.SocketIO, user: str) -> float:
    sock.sendall(f"USER {user}\r\n".encode())
    assert reader.readline().startswith(b"+OK")
    started = time.perf_counter()
    sock.sendall(b"PASS wrong-password\r\n")
    reply = reader.readline()
    elapsed = time.perf_counter() - started
    assert reply == b"-ERR [AUTH] Authentication failed.\r\n", reply
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="attempts per class")
    parser.add_argument("--scheme", default="ARGON2ID")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="popbox-timing-") as tmp:
        server, port = start_server(Path(tmp), args.scheme)
        try:
            sock = socket.create_connection(("127.0.0.1", port), 30)
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"+OK")
            for _ in range(10):  # warm-up: caches, the thread pool, the dummy hash
                attempt(sock, reader, KNOWN)
                attempt(sock, reader, "nobody-here")
            known: list[float] = []
            unknown: list[float] = []
            for n in range(args.samples):
                # Alternate, and vary the unknown name so no cache can single it out.
                order = [(known, KNOWN), (unknown, f"ghost{n}")]
                if n % 2:
                    order.reverse()
                for bucket, user in order:
                    bucket.append(attempt(sock, reader, user))
            sock.close()
        finally:
            server.terminate()
            server.wait(30)
    u, p = mann_whitney_u(known, unknown)
    report = {
        "scheme": args.scheme,
        "samples_per_class": args.samples,
        "median_known_user_ms": round(statistics.median(known) * 1000, 3),
        "median_unknown_user_ms": round(statistics.median(unknown) * 1000, 3),
        "mean_known_user_ms": round(statistics.fmean(known) * 1000, 3),
        "mean_unknown_user_ms": round(statistics.fmean(unknown) * 1000, 3),
        "mann_whitney_u": u,
        "p_value": p,
        "verdict": "no detectable difference" if p > ALPHA else "DIFFERENCE DETECTED",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"timing-enumeration-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key}: {value}")
    print(f"report: {out}")
    sys.exit(0 if p > ALPHA else 1)


if __name__ == "__main__":
    main()
