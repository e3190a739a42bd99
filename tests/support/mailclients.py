"""mpop and fetchmail as devices: each keeps its own UIDL state and its own downloads,
as a phone and a desktop do. Test messages carry ``Subject: N``; ``numbers()`` is the
list of N downloaded so far, every copy counted."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.interop import require

__all__ = ["FetchmailDevice", "MpopDevice", "subject_numbers"]

HOST = "127.0.0.1"
# Only what the clients need: no user config, no locale surprises in their output.
_PATH = "/usr/bin:/bin"


def subject_numbers(paths: list[Path]) -> list[int]:
    """The N of each message's ``Subject: N``, sorted."""
    found = []
    for path in paths:
        line = next(x for x in path.read_bytes().splitlines() if x.startswith(b"Subject:"))
        found.append(int(line.split()[1]))
    return sorted(found)


class MpopDevice:
    """mpop with its own UIDL file, delivering into its own Maildir."""

    def __init__(
        self, workdir: Path, user: str, password: str, *, keep: bool = True, ca: Path | None = None
    ) -> None:
        """``ca``: trust this certificate for ``run(tls=True)``."""
        self.workdir = workdir
        self.user = user
        self.keep = keep
        self.ca = ca
        self.maildir = workdir / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        self.password = workdir / "password"
        self.password.write_text(password)
        self.password.chmod(0o600)

    def run(self, port: int, *, tls: bool = False) -> None:
        """One poll over plain POP3 or implicit TLS; fails the test if mpop fails."""
        security = (
            ["--tls=on", "--tls-starttls=off", f"--tls-trust-file={self.ca}"]
            if tls
            else ["--tls=off"]
        )
        result = subprocess.run(
            [
                require("mpop"),
                f"--host={HOST}",
                f"--port={port}",
                "--timeout=30",
                *security,
                "--auth=user",
                f"--user={self.user}",
                f"--passwordeval=cat {self.password}",
                f"--delivery=maildir,{self.maildir}",
                f"--uidls-file={self.workdir / 'uidls'}",
                "--received-header=off",
                "--only-new=on",
                f"--keep={'on' if self.keep else 'off'}",
                "--half-quiet",
            ],
            capture_output=True,
            env={"HOME": str(self.workdir), "PATH": _PATH, "LC_ALL": "C"},
            timeout=60,
            check=False,
        )
        # mpop exits 0 also when there is nothing new.
        assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")

    def numbers(self) -> list[int]:
        return subject_numbers(list((self.maildir / "new").iterdir()))


class FetchmailDevice:
    """fetchmail with its own id file, one file per downloaded message.

    ``keep``: leave mail on the server and fetch only what the id file does not know
    (UIDL); else fetch everything and delete it.
    """

    MDA = '#!/bin/sh\nexec cat > "$(mktemp "$1/msg.XXXXXXXX")"\n'

    def __init__(
        self, workdir: Path, user: str, password: str, *, keep: bool = True, ca: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.user = user
        self.password = password
        self.keep = keep
        self.ca = ca
        self.outdir = workdir / "delivered"
        self.outdir.mkdir(parents=True)
        self.mda = workdir / "mda.sh"
        self.mda.write_text(self.MDA)
        self.mda.chmod(0o700)

    def run(self, port: int, *, tls: bool = False) -> None:
        """One poll over plain POP3 or implicit TLS; fails the test if fetchmail fails."""
        # sslproto '' keeps fetchmail from trying STLS on a plain connection.
        security = (
            f"  ssl sslcertck sslcertfile '{self.ca}' sslcommonname 'localhost'\n"
            if tls
            else "  sslproto ''\n"
        )
        retrieval = "uidl" if self.keep else ""
        rc = self.workdir / "fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            f"poll {HOST} port {port} protocol pop3 {retrieval} timeout 30\n"
            f"  user '{self.user}' there with password '{self.password}' is 'me' here\n"
            f"{security}"
            f'  mda "{self.mda} {self.outdir}"\n'
            f"  {'keep' if self.keep else 'fetchall nokeep'}\n"
        )
        rc.chmod(0o600)
        result = subprocess.run(
            [
                require("fetchmail"),
                "--nodetach",
                "--daemon",
                "0",
                "--nosyslog",
                "--fetchmailrc",
                str(rc),
                "--idfile",
                str(self.workdir / "fetchids"),
                "--pidfile",
                str(self.workdir / "fetchmail.pid"),
            ],
            capture_output=True,
            env={
                "HOME": str(self.workdir),
                "FETCHMAILHOME": str(self.workdir),
                "PATH": _PATH,
                "LC_ALL": "C",
            },
            timeout=60,
            check=False,
        )
        # 1 is fetchmail's "no new mail".
        assert result.returncode in (0, 1), (result.stdout + result.stderr).decode(errors="replace")

    def numbers(self) -> list[int]:
        return subject_numbers(list(self.outdir.iterdir()))
