"""The bridge into IMAP: `popbox fetch` from POP3 into a Dovecot folder over IMAPS.

The collector's mailbox (1,000 messages by default, the realistic mix without
multi-megabyte attachments) is fetched over plain POP3 from the same Dovecot as the
collector comparison (bench.collector) and APPENDed over implicit TLS into a second,
IMAP-only Dovecot, with bench.latency_proxy adding 10 ms each way on both sides (20 ms
round trips to each server), keeping the mail on the POP3 server. The IMAP sink runs
with its defaults: four connections, MULTIAPPEND batches, LITERAL+, the X-Popbox-Id
header. Beside it, the same run measures mpop and fetchmail (POP3 into a local
Maildir, bench.collector's setup) at 20 ms RTT, the figures the bridge is read against.

    .venv/bin/python -m bench.imap_bridge [--messages 1000]   # alone, as root
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Final

from bench import collector, servers
from bench import dataset as ds

__all__ = ["run_bridge"]

# Each direction of each link is delayed this much: 20 ms round trips.
ONE_WAY_MS: Final = 10.0
# A bridge run that has not finished in this time is stuck.
RUN_TIMEOUT: Final = 1800.0
FOLDER: Final = "Bridged"


def _imap_dovecot(
    root: Path, cert: Path, key: Path, passwd: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """An IMAP-only Dovecot on ``root`` for the dataset's users; (process, imaps port)."""
    uid, gid = servers.mail_ids()
    if root.exists():
        shutil.rmtree(root)
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir(parents=True)
    os.chown(root / "mail", uid, gid)
    for path in [root, *root.parents]:
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o711)
    shutil.copy(passwd, root / "passwd")
    os.chmod(root / "passwd", 0o644)
    port = servers.free_port()
    config = root / "dovecot.conf"
    config.write_text(f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
auth_mechanisms = plain login
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = {uid}
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
""")
    with (root / "stderr.log").open("ab") as stderr:
        process = subprocess.Popen(
            [servers.DOVECOT, "-F", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return process, port
        except OSError:
            if process.poll() is not None:
                raise RuntimeError((root / "stderr.log").read_text(errors="replace")) from None
            time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError("the IMAP Dovecot did not start")


def _fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return hashlib.sha256(der).hexdigest()


def _config(base: Path, pop3: int, imaps: int, user: str, cert: Path) -> Path:
    (base / "password").write_text(ds.PASSWORD + "\n")
    config = base / "fetch.toml"
    config.write_text(f"""[fetch]
state_dir = "{base / "state"}"

[[fetch.accounts]]
name = "bench"
host = "127.0.0.1"
port = {pop3}
security = "none"
allow_plaintext_password = true
username = "{user}"
password_file = "{base / "password"}"
delete = "keep"

[[fetch.accounts.sinks]]
kind = "imap"
host = "127.0.0.1"
port = {imaps}
security = "tls"
tls_fingerprint = "{_fingerprint(cert)}"
username = "{user}"
password_file = "{base / "password"}"
folder = "{FOLDER}"
""")
    return config


def _stored(root: Path, user: str) -> int:
    box = root / "mail" / user / f".{FOLDER}"
    return sum(1 for sub in ("new", "cur") if (box / sub).is_dir() for _ in (box / sub).iterdir())


def measure_bridge(dataset: ds.Dataset, work: Path, pop3_port: int) -> tuple[float, int, str]:
    """Seconds for one bridge run through the proxies, messages stored, a problem or ""."""
    user = dataset.collector_user
    dest = work / "imap-dest"
    imap, imaps_port = _imap_dovecot(dest, dataset.cert, dataset.key, dataset.passwd)
    proxies = []
    try:
        pop3_proxy, pop3_via = collector.start_proxy(pop3_port, ONE_WAY_MS)
        proxies.append(pop3_proxy)
        imap_proxy, imaps_via = collector.start_proxy(imaps_port, ONE_WAY_MS)
        proxies.append(imap_proxy)
        base = work / "bridge-run"
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        config = _config(base, pop3_via, imaps_via, user, dataset.cert)
        os.sync()
        start = time.perf_counter()
        with (base / "output.log").open("wb") as log:
            done = subprocess.run(
                [collector.POPBOX, "fetch", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        elapsed = time.perf_counter() - start
        stored = _stored(dest, user)
        problem = ""
        if done.returncode != 0:
            tail = (base / "output.log").read_text(errors="replace")[-400:]
            problem = f"exit {done.returncode}: {tail!r}"
        return elapsed, stored, problem
    finally:
        for proxy in proxies:
            os.killpg(proxy.pid, signal.SIGKILL)
            proxy.wait()
        os.killpg(imap.pid, signal.SIGTERM)
        imap.wait(15)


def run_bridge(dataset: ds.Dataset, work: Path, *, compare: bool = True) -> str:
    """The bridge's figure and, with ``compare``, mpop's and fetchmail's at 20 ms RTT."""
    manifest = dataset.manifest(dataset.collector_user)
    expected = len(manifest.hashes)
    megabytes = manifest.wire_octets / 1e6
    source = servers.start_dovecot(
        work / "dovecot", "dovecot-reuse", dataset.cert, dataset.key, sessions=100
    )
    try:
        elapsed, stored, problem = measure_bridge(dataset, work, source.pop3_port)
    finally:
        source.stop()
    print(f"    bridge into IMAP    {elapsed:8.2f} s stored={stored} {problem}", flush=True)
    lines = [
        "",
        "## The bridge into IMAP",
        "",
        f"{expected:,} messages ({megabytes:.0f} MB on the wire): POP3 (plain) from Dovecot "
        "-> `popbox fetch` -> IMAPS APPEND into a second Dovecot, 20 ms RTT on both links.",
        "",
        "| client | what | seconds | messages/s | MB/s |",
        "|---|---|---|---|---|",
    ]
    if problem or stored != expected:
        lines.append("| popbox fetch | POP3 -> IMAP (TLS) | — | — | — |")
        lines += ["", f"Problem: stored {stored} of {expected}. {problem}"]
    else:
        lines.append(
            f"| popbox fetch | POP3 -> IMAP (TLS) | {elapsed:.1f} | "
            f"{expected / elapsed:,.0f} | {megabytes / elapsed:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    if compare:
        text += collector.run_comparison(
            dataset, work, clients=("popbox fetch", "mpop", "fetchmail"), links=("20 ms RTT",)
        )
    return text


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/popbox-bench-bridge"))
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="only the bridge, not mpop and fetchmail beside it",
    )
    args = parser.parse_args()
    sizes = ds.Sizes(
        login_users=1,
        login_messages=1,
        retr_users=1,
        retr_messages=1,
        churn_users=1,
        churn_messages=1,
        idle_users=1,
        bigbox_messages=10,
        collector_messages=args.messages,
    )
    dataset = ds.build(args.work, sizes)
    ds.install(dataset, args.work / "dovecot", owner=servers.mail_ids(), collector=True)
    print(run_bridge(dataset, args.work, compare=not args.no_compare))


if __name__ == "__main__":
    main()
