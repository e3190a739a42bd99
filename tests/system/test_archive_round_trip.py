"""The archive's round trip as a user makes it, all through the command line: import
the mbox a desktop client left behind, search it, export it as a Maildir, back the
server up, restore it on another machine, and get every message back byte for byte."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from support.serverproc import POPBOX

# Messages as a desktop client received them: LF and CRLF line ends, an encoded
# subject, an attachment, and a body line that starts with "From ".
_MESSAGES = [
    b"From: Carol <carol@example.org>\nTo: alice@example.test\nSubject: Quarterly report\n"
    b"Date: Mon, 02 Mar 2026 09:00:00 +0000\nMessage-ID: <q1@example.org>\n\n"
    b"The quarterly report is attached in spirit.\n",
    b"From: Bank <no-reply@bank.example>\r\nTo: alice@example.test\r\n"
    b"Subject: =?utf-8?q?Kontoauszug_M=C3=A4rz?=\r\nDate: Tue, 03 Mar 2026 10:00:00 +0100\r\n"
    b"Message-ID: <stmt@bank.example>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Ihr Kontoauszug f\xc3\xbcr M\xc3\xa4rz.\r\n"
    b'--b1\r\nContent-Type: application/pdf; name="statement.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJcOkw7zDtsOfCg==\r\n--b1--\r\n",
    b"From: Dave <dave@example.net>\nTo: alice@example.test\nSubject: lunch\n"
    b"Date: Wed, 04 Mar 2026 12:00:00 +0000\n\nShall we meet at noon?\n"
    b"From the canteen, with love.\n",
]


def _mbox(path: Path) -> None:
    """The messages as Thunderbird keeps a local folder: "From - date" separators,
    and a body line starting with "From " written as ">From "."""
    with path.open("wb") as out:
        for message in _MESSAGES:
            quoted = re.sub(rb"(?m)^From ", b">From ", message)
            out.write(b"From - Mon Mar  2 09:00:00 2026\n" + quoted + b"\n")


def _config(directory: Path) -> Path:
    directory.mkdir(parents=True)
    passwd = directory / "passwd"
    passwd.write_text("alice:{PLAIN}secret::::::\n")
    passwd.chmod(0o600)
    config = directory / "popbox.toml"
    config.write_text(f'data_dir = "{directory / "data"}"\n[auth]\npasswd_file = "{passwd}"\n')
    config.chmod(0o600)
    return config


def _popbox(config: Path, *args: str) -> str:
    done = subprocess.run(
        [*POPBOX, *args, "--config", str(config)], capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


def _search(config: Path, query: str) -> list[str]:
    document = json.loads(_popbox(config, "archive", "search", "alice", query, "--json"))
    return [hit["subject"] for hit in document["hits"]]


def _maildir_messages(path: Path) -> list[bytes]:
    return sorted(
        file.read_bytes() for folder in ("cur", "new") for file in (path / folder).iterdir()
    )


def test_import_search_export_backup_restore_keeps_every_octet(tmp_path: Path) -> None:
    first = _config(tmp_path / "first")
    source = tmp_path / "Inbox"
    _mbox(source)
    _popbox(first, "archive", "import", "alice", str(source))
    # Imported twice (a rerun): recognised, nothing stored again.
    _popbox(first, "archive", "import", "alice", str(source))

    assert _search(first, "quarterly") == ["Quarterly report"]
    assert _search(first, "kontoauszug has:attachment") == ["Kontoauszug März"]
    assert _search(first, "filename:statement") == ["Kontoauszug März"]
    assert _search(first, '"meet at noon"') == ["lunch"]
    assert _search(first, "after:2026-03-03 -lunch") == ["Kontoauszug März"]

    exported = tmp_path / "export"
    _popbox(first, "archive", "export", "alice", "--format", "maildir", "--output", str(exported))
    assert _maildir_messages(exported) == sorted(_MESSAGES)

    backups = tmp_path / "backups"
    _popbox(first, "backup", str(backups))
    second = _config(tmp_path / "second")
    (tmp_path / "second" / "passwd").unlink()
    _popbox(second, "restore", str(backups))

    assert _search(second, "quarterly") == ["Quarterly report"]
    assert sorted(_search(second, "")) == sorted(_search(first, ""))
    again = tmp_path / "export-again"
    _popbox(second, "archive", "export", "alice", "--format", "maildir", "--output", str(again))
    assert _maildir_messages(again) == sorted(_MESSAGES)
