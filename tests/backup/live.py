"""A real `popbox serve` whose data directory is apart from its config file (as an
operator's is), what a POP3 client sees of a mailbox, and the popbox command line."""

from __future__ import annotations

import hashlib
import poplib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.ports import free_port
from support.serverproc import POPBOX, ServerProcess

PASSWORD = "secret"
# Deletions move mail to Trash, so a user's mailbox has a folder of its own making.
MAILBOX = '[mailbox]\ndisposition = "trash"\ntrash_days = 7\n'
# The server keeps a copy of every delivery in its archive (popbox.archive.sqlite).
ARCHIVE = '[archive]\nkeep = ["delivered"]\n'


@dataclass(frozen=True)
class Seen:
    """What one login saw: (UIDL, LIST size, SHA-256 of RETR's octets, Subject) per
    message."""

    messages: tuple[tuple[str, int, str, str], ...]

    @property
    def uidls(self) -> list[str]:
        return [message[0] for message in self.messages]

    @property
    def subjects(self) -> list[str]:
        return [message[3] for message in self.messages]


def make_config(
    directory: Path, users: tuple[str, ...] = (), *, passwd: bool = True
) -> ServerProcess:
    """A config in ``directory`` whose data lives in ``directory/data``; a passwd file
    with PLAIN passwords for ``users`` when ``passwd`` (a fresh machine has none)."""
    data = directory / "data"
    directory.mkdir(parents=True, exist_ok=True)
    if passwd:
        data.mkdir(mode=0o700)
        path = data / "passwd"
        path.write_text("".join(f"{user}:{{PLAIN}}{PASSWORD}::::::\n" for user in users))
        path.chmod(0o600)
    pop3, lmtp = free_port(), free_port()
    config = directory / "popbox.toml"
    config.write_text(
        f'data_dir = "{data}"\n'
        f'[pop3]\nlisten = ["127.0.0.1:{pop3}"]\ntls_listen = []\nplaintext_auth = "always"\n'
        f'[lmtp]\nlisten = ["127.0.0.1:{lmtp}"]\n'
        f"[limits]\nauth_failure_delay = 0\nauth_penalty_max = 0\nshutdown_grace = 1\n"
        f"{MAILBOX}{ARCHIVE}"
    )
    config.chmod(0o600)
    return ServerProcess(directory, config, pop3, lmtp, users)


def popbox(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*POPBOX, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def see(server: ServerProcess, login: str, password: str = PASSWORD) -> Seen:
    """Log in as ``login``, take UIDL, LIST and every message, QUIT deleting nothing."""
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
    try:
        client.user(login)
        client.pass_(password)
        return _seen(client)
    finally:
        client.quit()


def _seen(client: poplib.POP3) -> Seen:
    uidls = [line.split() for line in client.uidl()[1]]
    sizes = {int(number): int(size) for number, size in (line.split() for line in client.list()[1])}
    messages = []
    for number_text, uidl in uidls:
        number = int(number_text)
        lines = client.retr(number)[1]
        digest = hashlib.sha256(b"\r\n".join(lines) + b"\r\n").hexdigest()
        subject = next((line[9:].decode() for line in lines if line.startswith(b"Subject: ")), "")
        messages.append((uidl.decode(), sizes[number], digest, subject))
    return Seen(tuple(messages))


def see_and_delete_first(server: ServerProcess, login: str) -> Seen:
    """What ``login`` sees, then DELE 1 and QUIT (the deletion committed)."""
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
    try:
        client.user(login)
        client.pass_(PASSWORD)
        seen = _seen(client)
        if seen.messages:
            client.dele(1)
        return seen
    finally:
        client.quit()


def delete(server: ServerProcess, login: str, numbers: tuple[int, ...]) -> None:
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
    try:
        client.user(login)
        client.pass_(PASSWORD)
        for number in numbers:
            client.dele(number)
    finally:
        client.quit()


def message(name: str) -> bytes:
    return (
        f"From: sender@example.net\r\nMessage-ID: <{name}@popbox.test>\r\n"
        f"Subject: {name}\r\n\r\nbody of {name}\r\n"
    ).encode()
