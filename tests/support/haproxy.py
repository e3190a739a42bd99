"""A real HAProxy (Debian's /usr/sbin/haproxy) running contrib/haproxy/haproxy.cfg.

The file users copy is the file the tests run: ``render`` changes only the example
addresses and ports it lists at its top (every one must be there, and none may be
left), and ``HAProxy`` runs it in the foreground behind a ``global`` section of the
test's own: no chroot, no user switch, no syslog, and an admin socket in a temporary
directory through which tests read each server's health-check state.
"""

from __future__ import annotations

import contextlib
import csv
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CONTRIB_CONFIG", "HAPROXY", "NODES", "HAProxy", "addresses", "render"]

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

CONTRIB_CONFIG = Path(__file__).resolve().parents[2] / "contrib" / "haproxy" / "haproxy.cfg"
# How long HAProxy may take to parse its config and bind.
START_TIMEOUT = 15.0
# The example addresses the contrib file uses; render() must replace each occurrence.
EXAMPLE_ADDRESS = re.compile(r"\b(?:192\.0\.2\.10|10\.0\.0\.1[0-2])\b")

_GLOBAL = """\
global
    stats socket {socket} mode 600 level admin
    log stdout format raw local0 info
"""


# The contrib file's example nodes, in its order.
NODES = ("10.0.0.11", "10.0.0.12")


def addresses(
    host: str, front: tuple[int, int, int], nodes: list[tuple[int, int, int]]
) -> dict[str, str]:
    """``render``'s replacements for a balancer on ``host`` whose POP3, POP3S and LMTP
    ports are ``front``, in front of nodes on ``host`` with those three ports each."""
    pop3, pop3s, lmtp = front
    replacements = {
        "192.0.2.10:110": f"{host}:{pop3}",
        "192.0.2.10:995": f"{host}:{pop3s}",
        "10.0.0.10:24": f"{host}:{lmtp}",
    }
    for (node_pop3, node_pop3s, node_lmtp), example in zip(nodes, NODES, strict=True):
        replacements[f"{example}:110"] = f"{host}:{node_pop3}"
        replacements[f"{example}:995"] = f"{host}:{node_pop3s}"
        replacements[f"{example}:24"] = f"{host}:{node_lmtp}"
    return replacements


def render(replacements: Mapping[str, str], template: Path = CONTRIB_CONFIG) -> str:
    """The contrib config with each ``HOST:PORT`` of ``replacements`` replaced."""
    text = template.read_text()
    for old, new in replacements.items():
        assert re.search(rf"{re.escape(old)}\b", text), f"{old} is not in {template}"
        text = re.sub(rf"{re.escape(old)}\b", new, text)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    left = EXAMPLE_ADDRESS.findall(body)
    assert not left, f"example addresses left in the config: {left}"
    return text


class HAProxy:
    """One HAProxy process in ``directory``, started with ``config`` (the rendered
    contrib file); ``stop`` ends it."""

    def __init__(self, directory: Path, config: str) -> None:
        self.directory = directory
        self.socket = directory / "admin.sock"
        self.log = directory / "haproxy.log"
        (directory / "global.cfg").write_text(_GLOBAL.format(socket=self.socket))
        (directory / "popbox.cfg").write_text(config)
        self._command = [
            HAPROXY, "-db", "-f", str(directory / "global.cfg"), "-f", str(directory / "popbox.cfg")
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                self._command, cwd=self.directory, stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited:\n{self.log_text()}")
            with contextlib.suppress(OSError):
                self.command("show info")
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"haproxy did not start:\n{self.log_text()}")

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def command(self, line: str) -> str:
        """One command on the admin socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> its status once a health check has run (UP, DOWN, ...);
        "INI" before (HAProxy starts servers as UP without having checked them)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(line for line in text.splitlines() if line)
        return {
            (row["pxname"], row["svname"]): (
                row["status"].split()[0] if row["check_status"].strip("* ") != "INI" else "INI"
            )
            for row in rows
            if row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_for(self, wanted: Mapping[tuple[str, str], str], timeout: float = 60.0) -> None:
        """Wait until each (backend, server) has the status wanted after a check; fail
        after ``timeout``."""
        deadline = time.monotonic() + timeout
        states: dict[tuple[str, str], str] = {}
        while time.monotonic() < deadline:
            states = self.states()
            if all(states.get(key) == status for key, status in wanted.items()):
                return
            time.sleep(0.2)
        raise AssertionError(f"health checks say {states}, not {dict(wanted)}:\n{self.log_text()}")
