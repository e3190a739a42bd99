"""A real `popbox serve` in a subprocess, for tests that kill it, limit it or measure it.

Each test gets its own data directory, free loopback ports, PLAIN passwords (cheap to
check, so the tests measure the server and not the hash) and the process's log.
"""

from __future__ import annotations

import contextlib
import poplib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support.ports import free_port

# The popbox command line of the interpreter running the tests.
POPBOX = [sys.executable, "-m", "popbox"]
# How long `popbox serve` may take to listen (imports, passwd file, first-run cert).
START_TIMEOUT = 30.0
PASSWORD = "secret"


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``; fail if
    ``process`` exits first or nothing listens within START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"popbox serve exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


class ClosingPOP3(poplib.POP3):
    """poplib.POP3 that closes its socket when the greeting never comes (a killed or
    overloaded server), instead of leaving it to the garbage collector."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            super().__init__(host, port, timeout=timeout)
        except BaseException:
            sock = getattr(self, "sock", None)
            if sock is not None:
                sock.close()
            raise


@dataclass
class ServerProcess:
    """Where a `popbox serve` listens and how to reach its files."""

    directory: Path
    config: Path
    pop3_port: int
    lmtp_port: int
    users: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / "serve.log"

    @property
    def maildir_root(self) -> Path:
        return self.directory / "mail"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start the server and wait until both POP3 and LMTP accept connections."""
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [*POPBOX, "serve", "--config", str(self.config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec_fn,
            )
        deadline = time.monotonic() + START_TIMEOUT
        pending = {self.pop3_port, self.lmtp_port}
        while pending and time.monotonic() < deadline and self.process.poll() is None:
            for port in list(pending):
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    pending.discard(port)
            if pending:
                time.sleep(0.05)
        if pending:
            self.kill()
            raise AssertionError(f"popbox serve did not start:\n{self.log_text()}")
        # Bound sockets accept before the server serves them (the privilege drop and
        # the imports come in between): wait for a greeting, so measurements start
        # from a server that is up.
        with socket.create_connection(("127.0.0.1", self.pop3_port), timeout=START_TIMEOUT) as sock:
            sock.settimeout(START_TIMEOUT)
            assert sock.recv(1024).startswith(b"+OK"), self.log_text()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait for the graceful shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self, field_name: str) -> str:
        """A line of /proc/PID/status, e.g. ``Uid`` or ``VmHWM``."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field_name}:[ \t]*(.*)$", text, re.MULTILINE)
        assert match is not None, field_name
        return match.group(1)

    def rss_kib(self) -> int:
        return int(self.status("VmRSS").split()[0])

    def pop3(self, user: str, timeout: float = 10.0) -> poplib.POP3:
        client = ClosingPOP3("127.0.0.1", self.pop3_port, timeout=timeout)
        try:
            client.user(user)
            client.pass_(PASSWORD)
        except BaseException:
            client.close()
            raise
        return client


def make_server(
    directory: Path,
    users: tuple[str, ...] = ("alice", "bob"),
    *,
    extra: str = "",
    limits: str = "",
    pop3_port: int | None = None,
) -> ServerProcess:
    """Write a config and a passwd file for a plain-POP3 + LMTP server in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    passwd = directory / "passwd"
    passwd.write_text("".join(f"{user}:{{PLAIN}}{PASSWORD}::::::\n" for user in users))
    passwd.chmod(0o600)
    pop3 = pop3_port or free_port()
    lmtp = free_port()
    config = directory / "popbox.toml"
    config.write_text(
        f'data_dir = "{directory}"\n{extra}'
        f'[pop3]\nlisten = ["127.0.0.1:{pop3}"]\ntls_listen = []\nplaintext_auth = "always"\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{lmtp}"]\n'
        f"[limits]\nauth_failure_delay = 0\nshutdown_grace = 1\n{limits}"
    )
    config.chmod(0o600)
    return ServerProcess(directory, config, pop3, lmtp, users)


@contextlib.contextmanager
def running(server: ServerProcess, **kwargs: Callable[[], None] | None) -> Iterator[ServerProcess]:
    server.start(**kwargs)
    try:
        yield server
    finally:
        server.kill()


def deliver_lmtp(port: int, user: str, message: bytes) -> int:
    """One LMTP delivery; the reply code (250 when the server has it for good)."""
    import smtplib

    with smtplib.LMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("hardening.test")
        client.mail("sender@example.net")
        client.rcpt(f"{user}@example.test")
        code, _ = client.data(message)
        return code

