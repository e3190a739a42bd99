"""A real, private Dovecot POP3 (and IMAP) server on loopback for tests, in a temporary
directory.

Dovecot comes from Debian's dovecot-core, dovecot-pop3d and dovecot-imapd packages. The
server gets its own dovecot.conf (base_dir, state, logs and mail all under the temp
directory), TLS with the test CA's certificate, a passwd-file of test users and
Maildirs that the tests fill directly. With dovecot-imapd installed it also serves IMAP
(``imap_port``: plaintext with STARTTLS, ``imaps_port``: implicit TLS), so the IMAP
sink has a real destination; ``folder_messages`` reads what a user's folder holds.
It must run as root (Dovecot switches users itself); otherwise the tests that need it
skip with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.ports import free_port

__all__ = ["DovecotServer", "dovecot_skip_reason", "imap_skip_reason", "start_dovecot"]

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
# Present when dovecot-imapd is installed: the server then speaks IMAP as well.
IMAP_BINARY = "/usr/lib/dovecot/imap"
# Dovecot refuses uid 0 for mail access; Debian's "mail" user owns the test Maildirs.
MAIL_USER = "mail"


def _mail_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


MAIL_UID, MAIL_GID = _mail_ids()


def dovecot_skip_reason() -> str | None:
    if not Path(DOVECOT).exists():
        return "dovecot is not installed (apt-get install dovecot-core dovecot-pop3d)"
    if os.geteuid() != 0:
        return "a private dovecot needs root to switch users"
    if not Path("/usr/lib/dovecot/pop3").exists():
        return "dovecot-pop3d is not installed"
    return None


def imap_skip_reason() -> str | None:
    """Why the private Dovecot cannot serve IMAP here, or None."""
    reason = dovecot_skip_reason()
    if reason is None and not Path(IMAP_BINARY).exists():
        reason = "dovecot-imapd is not installed"
    return reason


@dataclass
class DovecotServer:
    root: Path
    pop3_port: int
    pop3s_port: int
    process: subprocess.Popen[bytes] | None = None
    passwords: dict[str, str] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    imap_port: int = 0
    """IMAP with STARTTLS (0: no IMAP, dovecot-imapd missing)."""
    imaps_port: int = 0
    """IMAP over implicit TLS (0: no IMAP)."""
    _sequence: int = 0

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user

    def add_user(self, user: str, password: str, *, stored: str | None = None) -> None:
        """Add ``user`` with ``password`` as {PLAIN}, or with the ``stored`` value (a
        hash or a SCRAM key) in the passwd file instead."""
        self.passwords[user] = password
        self.stored[user] = stored if stored is not None else "{PLAIN}" + password
        lines = [f"{name}:{value}::::::" for name, value in self.stored.items()]
        (self.root / "passwd").write_text("\n".join(lines) + "\n")
        for path in (self.maildir(user), self.root / "home" / user):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, MAIL_UID, MAIL_GID)
        for sub in ("cur", "new", "tmp"):
            self.maildir(user).joinpath(sub).mkdir(exist_ok=True)
            os.chown(self.maildir(user) / sub, MAIL_UID, MAIL_GID)

    def add_message(self, user: str, data: bytes) -> None:
        """Drop a message into the user's Maildir new/ (as an MDA would)."""
        self._sequence += 1
        name = f"{time.time():.0f}.P{os.getpid()}Q{self._sequence}.test"
        tmp = self.maildir(user) / "tmp" / name
        tmp.write_bytes(data)
        os.chown(tmp, MAIL_UID, MAIL_GID)
        tmp.rename(self.maildir(user) / "new" / name)

    def stored_messages(self, user: str) -> list[Path]:
        box = self.maildir(user)
        return sorted(p for sub in ("new", "cur") for p in (box / sub).iterdir())

    def folder_path(self, user: str, folder: str = "INBOX") -> Path:
        """The Maildir of ``user``'s IMAP ``folder`` (Maildir++: ``.Folder``)."""
        if folder.upper() == "INBOX":
            return self.maildir(user)
        return self.maildir(user) / ("." + folder.replace("/", "."))

    def folder_messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        """Every message in ``user``'s ``folder`` as stored (IMAP saves keep CRLF),
        sorted by content; empty when the folder does not exist."""
        box = self.folder_path(user, folder)
        return sorted(
            p.read_bytes()
            for sub in ("new", "cur")
            if (box / sub).is_dir()
            for p in (box / sub).iterdir()
        )

    def kick(self, user: str) -> None:
        """Drop every session of ``user`` (``doveadm kick``), as a server restart would."""
        subprocess.run(
            [DOVEADM, "-c", str(self.config_path), "kick", user], capture_output=True, check=True
        )

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


def _config(server: DovecotServer, cert: Path, key: Path, extra: str) -> str:
    root = server.root
    return f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = {"pop3 imap" if server.imap_port else "pop3"}
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain login
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = {MAIL_UID}
mail_location = maildir:{root}/mail/%u
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={root}/home/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {server.pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {server.pop3s_port}
    ssl = yes
  }}
}}
{_imap_config(server)}
{extra}
"""


def _imap_config(server: DovecotServer) -> str:
    if not server.imap_port:
        return ""
    # mail_save_crlf: messages appended over IMAP are stored byte for byte as sent, so
    # tests compare Maildir files with what the client appended.
    return f"""
protocol imap {{
  mail_save_crlf = yes
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {server.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {server.imaps_port}
    ssl = yes
  }}
}}
"""


def start_dovecot(root: Path, cert: Path, key: Path, extra_config: str = "") -> DovecotServer:
    """Configure and start Dovecot under ``root``; skips the test when it cannot run."""
    reason = dovecot_skip_reason()
    if reason:
        pytest.skip(reason)
    root.mkdir(parents=True, exist_ok=True)
    # Dovecot's unprivileged processes (dovenull, dovecot, mail) must reach everything
    # under root; root's parents must be searchable too, so callers put root outside
    # pytest's 0700 tmp tree (tempfile.mkdtemp under /tmp: other pytest runs reset
    # /tmp/pytest-of-root to 0700 at any moment).
    root.chmod(0o711)
    # Private copies: the certificate must stay readable however the caller's
    # directory is protected.
    shutil.copyfile(cert, root / "cert.pem")
    shutil.copyfile(key, root / "key.pem")
    (root / "key.pem").chmod(0o600)
    cert, key = root / "cert.pem", root / "key.pem"
    for sub in ("run", "state", "mail", "home"):
        (root / sub).mkdir(exist_ok=True)
    server = DovecotServer(root=root, pop3_port=free_port(), pop3s_port=free_port())
    if Path(IMAP_BINARY).exists():
        server.imap_port, server.imaps_port = free_port(), free_port()
    (root / "passwd").write_text("")
    server.config_path.write_text(_config(server, cert, key, extra_config))
    check = subprocess.run(
        [DOVECOT, "-n", "-c", str(server.config_path)], capture_output=True, text=True
    )
    if check.returncode != 0:
        raise RuntimeError(f"dovecot -n rejected the config: {check.stderr}")
    with (root / "stderr.log").open("wb") as stderr:
        server.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(server.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            err = (root / "stderr.log").read_text(errors="replace")
            raise RuntimeError(f"dovecot exited: {err}\n{server.log()}")
        try:
            ports = (server.pop3_port, server.pop3s_port, server.imap_port, server.imaps_port)
            for port in filter(None, ports):
                socket.create_connection(("127.0.0.1", port), 1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"dovecot did not start listening\n{server.log()}")
