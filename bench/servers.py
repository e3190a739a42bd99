"""The servers under test: popbox and a private Dovecot, configured alike on loopback.

Both get the same users (one passwd file, the same hashes), the same certificate and a
copy each of the same generated Maildirs, so neither sees the other's index. Dovecot
runs in two shapes: its default process-per-session mode and a process-reuse mode
(pop3 service_count=100, pop3-login service_count=0, the "high-performance" login
mode); the benchmark compares popbox with the better of the two per figure.

Resource figures are taken over the whole process tree of each server: CPU is the
master's own time plus what it reaped from exited children (Dovecot's per-session
processes) plus the live descendants; memory is PSS from /proc/PID/smaps_rollup, so
pages shared between Dovecot's processes are not counted once per process.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil

__all__ = [
    "DOVECOT_MODES",
    "Server",
    "drop_caches",
    "free_port",
    "mail_ids",
    "start_dovecot",
    "start_popbox",
]

DOVECOT: Final = shutil.which("dovecot") or "/usr/sbin/dovecot"
POPBOX: Final = str(Path(sys.executable).with_name("popbox"))
# Dovecot refuses uid 0 for mail; Debian's "mail" user owns its copy of the Maildirs.
MAIL_USER: Final = "mail"
# A server that has not answered on its ports in this time failed to start.
START_TIMEOUT: Final = 60.0
# Dovecot's two shapes, named as they appear in the report.
DOVECOT_MODES: Final = ("dovecot-per-session", "dovecot-reuse")


def mail_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def drop_caches() -> bool:
    """Drop the page cache (root, not in every container); True when it was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


@dataclass
class Server:
    """One running server: its ports, its Maildir root and its process tree."""

    name: str
    kind: str  # "popbox" or "dovecot"
    root: Path
    maildir_root: Path
    pop3_port: int
    pop3s_port: int
    lmtp_port: int
    process: subprocess.Popen[bytes]
    notes: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    proxied: bool = False
    """Its listeners expect a PROXY header from loopback (a node behind HAProxy)."""

    def pids(self) -> list[int]:
        try:
            master = psutil.Process(self.process.pid)
            return [master.pid, *(child.pid for child in master.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User+system CPU of the tree so far, including reaped children."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        return total

    def pss_kib(self) -> int:
        """Proportional set size summed over every live process of the server."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        return total

    def process_count(self) -> int:
        return len(self.pids())

    def forget_index(self, user: str) -> None:
        """Delete the server's index for ``user`` so the next login is a cold one."""
        maildir = self.maildir_root / user
        prefix = "popbox-index" if self.kind == "popbox" else "dovecot"
        for entry in maildir.iterdir():
            if entry.name.startswith(prefix) and entry.is_file():
                entry.unlink()

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        # Per-session children that outlived the master would skew the next server,
        # and one still holding a socket makes the next Dovecot refuse to start
        # ("already running?"): SIGKILL them and wait until they are gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        _wait_group_gone(self.process.pid)


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    """Wait until no live (non-zombie) process is left in process group ``pgid``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rpartition(b")")[2].split()
            except OSError:
                continue  # gone meanwhile
            # After the command: state, ppid, pgrp.
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.05)


def _wait_ready(server: Server, log: Path) -> Server:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited at start:\n{log.read_text(errors='replace')}")
        try:
            for port in (server.pop3_port, server.pop3s_port, server.lmtp_port):
                with socket.create_connection((server.host, port), 2) as sock:
                    if server.proxied:
                        sock.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\n")
                    greeting = {server.pop3_port: b"+OK", server.lmtp_port: b"220"}
                    if port in greeting:
                        sock.settimeout(5)
                        if not sock.recv(100).startswith(greeting[port]):
                            raise OSError("no greeting")
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.name} did not start listening:\n{log.read_text(errors='replace')}")


def start_popbox(root: Path, cert: Path, key: Path, *, workers: int = 1,
                 limits: dict[str, float] | None = None, name: str = "popbox",
                 source: Path | None = None, postgresql: str | None = None,
                 config_name: str = "popbox.toml", proxy_from: str | None = None) -> Server:
    """Start ``popbox serve`` on ``root`` (which holds mail/ and passwd) on free ports.

    ``limits`` adds settings to the config's [limits] table (bench.idle raises the caps).
    ``source`` runs the popbox of another checkout (its ``src/`` goes first on the
    path, with this environment's dependencies): an earlier commit measured in the
    same run as this one, under ``name``. ``postgresql`` (a DSN) keeps mail and users
    in PostgreSQL instead (bench.scale); ``config_name`` lets several nodes share
    ``root``; ``proxy_from`` (an address) puts the node behind a balancer there.
    """
    pop3, pop3s, lmtp = free_port(), free_port(), free_port()
    # Every benchmark client comes from loopback; the per-IP bound would refuse them.
    settings: dict[str, float] = {"max_connections_per_ip": 1000000, **(limits or {})}
    limit_lines = "".join(f"{name} = {value}\n" for name, value in settings.items())
    proxy = ""
    if proxy_from is not None:
        proxy = f'proxy_protocol = true\ntrusted_proxies = ["{proxy_from}/32"]\n'
    backend = ""
    if postgresql is not None:
        # Nodes of bench.scale run for minutes each: a node's background sweep would
        # hold each folder's lease for a moment while clients log in ([IN-USE]).
        backend = f'''
[mailbox]
sweep_interval = 1000000

[postgresql]
dsn = "{postgresql}"
node_id = "{config_name.removesuffix('.toml')}"
'''
    config = root / config_name
    config.write_text(
        f"""data_dir = "{root}"
hostname = "localhost"

[pop3]
listen = ["127.0.0.1:{pop3}"]
tls_listen = ["127.0.0.1:{pop3s}"]
plaintext_auth = "loopback"
workers = {workers}
{proxy}
[tls]
cert = "{cert}"
key = "{key}"

[limits]
{limit_lines}
[auth]
passwd_file = "{root / 'passwd'}"
default_scheme = "SHA512-CRYPT"
{'backend = "postgresql"' if postgresql else ''}

[storage]
maildir_root = "{root / 'mail'}"
{'backend = "postgresql"' if postgresql else ''}

[lmtp]
listen = ["127.0.0.1:{lmtp}"]
{proxy}{backend}"""
    )
    log = root / f"{config_name.removesuffix('.toml')}.log"
    command = [POPBOX, "serve", "--config", str(config)]
    env = None
    if source is not None:
        command = [sys.executable, "-m", "popbox", "serve", "--config", str(config)]
        env = {**os.environ, "PYTHONPATH": str(source / "src")}
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            env=env,
        )
    server = Server(name, "popbox", root, root / "mail", pop3, pop3s, lmtp, process,
                    proxied=proxy_from is not None)
    if workers > 1:
        server.notes.append(f"pop3.workers = {workers}")
    return _wait_ready(server, log)


def _dovecot_config(
    root: Path, mode: str, pop3: int, pop3s: int, lmtp: int, cert: Path, key: Path,
    sessions: int,
) -> str:
    uid, gid = mail_ids()
    # Enough processes and clients for the idle scenario's sessions, with headroom.
    limit = sessions + 500
    cores = os.cpu_count() or 1
    if mode == "dovecot-per-session":
        login = ""
        pop3_service = "  service_count = 1\n"
    else:
        # Dovecot's documented high-performance login mode and reused mail processes.
        login = (
            f"  service_count = 0\n  process_min_avail = {cores}\n"
            f"  client_limit = {limit}\n  vsz_limit = 1G\n"
        )
        pop3_service = f"  service_count = 100\n  process_min_avail = {cores}\n"
    run = root / mode
    return f"""
base_dir = {run}/run
state_dir = {run}/state
log_path = {run}/dovecot.log
info_log_path = {run}/dovecot.log
protocols = pop3 lmtp
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain login
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = {uid}
mail_location = maildir:{root}/mail/%u
pop3_uidl_format = %08Xu%08Xv
mail_max_userip_connections = {limit}
default_process_limit = {limit}
default_client_limit = {limit * 2}
passdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service anvil {{
  client_limit = {limit * 3}
}}
service auth {{
  client_limit = {limit * 3}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s}
    ssl = yes
  }}
  process_limit = {limit}
{login}}}
service pop3 {{
  process_limit = {limit}
{pop3_service}}}
# Mail comes in over Dovecot's own LMTP, as into popbox's: the delivery is the
# server's work in both. It saves as the userdb's uid into the Maildir pop3 reads.
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
}}
"""


def start_dovecot(root: Path, mode: str, cert: Path, key: Path, *, sessions: int) -> Server:
    """Start a private Dovecot on ``root`` (mail/ and passwd) in one of DOVECOT_MODES."""
    if mode not in DOVECOT_MODES:
        raise ValueError(mode)
    run = root / mode
    for sub in ("run", "state"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    # Login processes run as dovenull and the auth process as dovecot: they must be
    # able to pass through the bench's directories.
    for path in [run, *run.parents]:
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o711)
    pop3, pop3s, lmtp = free_port(), free_port(), free_port()
    config = run / "dovecot.conf"
    config.write_text(_dovecot_config(root, mode, pop3, pop3s, lmtp, cert, key, sessions))
    check = subprocess.run([DOVECOT, "-n", "-c", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"dovecot -n rejected the config: {check.stderr}")
    log = run / "stderr.log"
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    server = Server(mode, "dovecot", root, root / "mail", pop3, pop3s, lmtp, process)
    return _wait_ready(server, log)
