"""`popbox archive`, every subcommand, as an administrator runs it: on a config file
with a passwd file and the embedded archive, through click's runner and, for import
and an export killed with SIGKILL part-way, as `python -m popbox` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from popbox.archive.export import CHECKPOINT_MESSAGES, state_path
from popbox.cli import main
from popbox.cli_support import CONFIG_ENV

PASSWD = """\
alice:{PLAIN}pw::::::popbox_archive_days=30
bob:{PLAIN}pw::::::
"""

# Thunderbird's Local Folders: mboxo with "From - " lines and CRLF, a subfolder, the
# summary files, a message deleted but not compacted, and a file that is no mail.
INBOX = [
    b"Return-Path: <carol@example.org>\r\nFrom: Carol <carol@example.org>\r\n"
    b"To: alice@example.org\r\nSubject: quarterly budget\r\n"
    b"Date: Mon, 06 Jan 2020 09:00:00 +0000\r\n\r\nThe budget is attached.\r\n"
    b"From now on, send it monthly.\r\n",
    b"From: Dave <dave@example.org>\r\nSubject: lunch\r\n"
    b"Date: Tue, 07 Jan 2020 12:00:00 +0000\r\n\r\nNoodles?\r\n",
]
LISTS = [b"From: list@example.org\nSubject: digest 1\n\nLF only, as some writers leave it\n"]


@dataclass
class Site:
    config_path: Path
    tmp: Path

    @property
    def env(self) -> dict[str, str]:
        return {CONFIG_ENV: str(self.config_path)}

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["archive", *args], env=self.env)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    def fails(self, *args: str) -> str:
        result = self.run(*args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        return result.output

    def popbox(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "popbox", "archive", *args],
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    (tmp_path / "passwd").write_text(PASSWD)
    config = tmp_path / "popbox.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[storage]\nmaildir_root = "{tmp_path / "mail"}"\n'
        f'[auth]\npasswd_file = "{tmp_path / "passwd"}"\n'
        "[archive]\nretention_days = 365\n"
    )
    return Site(config, tmp_path)


def _thunderbird(root: Path) -> Path:
    (root / "Inbox.sbd").mkdir(parents=True)

    def mbox(messages: list[bytes], line_end: bytes, deleted: bool = False) -> bytes:
        status = b"0009" if deleted else b"0001"
        return b"".join(
            b"From - Mon Jan 06 09:00:00 2020" + line_end
            + b"X-Mozilla-Status: " + status + line_end
            + message.replace(b"\nFrom ", b"\n>From ")
            + line_end
            for message in messages
        )  # fmt: skip

    (root / "Inbox").write_bytes(
        mbox(INBOX, b"\r\n") + mbox([b"Subject: gone\r\n\r\n"], b"\r\n", True)
    )
    (root / "Inbox.msf").write_bytes(b'// <!-- <mdb:mork:z v="1.4"/> -->\n')
    (root / "Inbox.sbd" / "Lists").write_bytes(mbox(LISTS, b"\n"))
    (root / "Inbox.sbd" / "Lists.msf").write_bytes(b"")
    (root / "popstate.dat").write_bytes(b"# POP3 State File\n")
    return root


def _with_status(message: bytes) -> bytes:
    line_end = b"\r\n" if b"\r\n" in message else b"\n"
    return b"X-Mozilla-Status: 0001" + line_end + message


def _search(site: Site, user: str, query: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(site.ok("search", user, query, "--json"))
    return result


def _ids(site: Site, user: str, query: str) -> list[int]:
    return [hit["id"] for hit in _search(site, user, query)["hits"]]


def test_import_a_thunderbird_tree_then_search_show_and_cat(site: Site) -> None:
    root = _thunderbird(site.tmp / "Local Folders")
    out = site.ok("import", "alice", str(root))
    assert out.strip() == (
        "alice: 3 new, 0 already kept, 0 unreadable, 1 deleted in Thunderbird (skipped)"
    )
    again = site.ok("import", "alice", str(root))
    assert "0 new, 3 already kept, 0 unreadable" in again

    found = _search(site, "alice", "budget")
    assert found["total"] == 1
    (hit,) = found["hits"]
    assert hit["subject"] == "quarterly budget"
    assert hit["folder"] == "Inbox"
    assert any(matched for _, matched in hit["snippet_parts"])

    plain = site.ok("search", "alice", "budget")
    assert f"{hit['id']}\t" in plain
    assert "**budget**" in plain.lower()

    show = site.ok("show", "alice", str(hit["id"]))
    assert "Subject:     quarterly budget" in show
    assert "Carol" in show

    cat = site.run("cat", "alice", str(hit["id"]))
    assert cat.exit_code == 0
    assert cat.stdout_bytes == _with_status(INBOX[0])

    (lists_id,) = _ids(site, "alice", "digest")
    assert site.run("cat", "alice", str(lists_id)).stdout_bytes == _with_status(LISTS[0])


def test_hold_blocks_delete_and_expire_until_released(site: Site) -> None:
    root = _thunderbird(site.tmp / "tb")
    site.ok("import", "alice", str(root))
    site.ok("import", "bob", str(root))
    (budget,) = _ids(site, "alice", "budget")
    (lunch,) = _ids(site, "alice", "lunch")

    assert "1 messages put on hold" in site.ok("hold", "alice", "--id", str(budget))
    refused = site.fails("delete", "alice", "--id", str(budget), "--id", str(lunch))
    assert "hold" in refused.lower()
    assert len(_ids(site, "alice", "")) == 3

    usage = {row["user"]: row for row in json.loads(site.ok("usage", "--json"))}
    assert (usage["alice"]["messages"], usage["alice"]["held"]) == (3, 1)
    assert (usage["bob"]["messages"], usage["bob"]["held"]) == (3, 0)

    # alice keeps 30 days (her passwd field), bob the server's 365.
    later = str(time.time() + 40 * 86400)
    out = site.ok("expire", "--now", later)
    assert "alice: 2 messages expired" in out
    assert "bob:" not in out
    assert _ids(site, "alice", "") == [budget]
    assert len(_ids(site, "bob", "")) == 3

    assert "1 messages released" in site.ok("release", "alice", "budget")
    assert "1 messages deleted" in site.ok("delete", "alice", "--id", str(budget))
    assert _ids(site, "alice", "") == []
    assert "3 messages put on hold" in site.ok("hold", "bob")
    assert "3 messages indexed" in site.ok("reindex", "bob")


def test_mistakes_are_explained_with_exit_code_1_and_no_traceback(site: Site) -> None:
    root = _thunderbird(site.tmp / "tb")
    site.ok("import", "alice", str(root))
    (budget,) = _ids(site, "alice", "budget")
    assert "query:" in site.fails("search", "alice", "subject:(budget")
    assert "no user mallory" in site.fails("search", "mallory", "budget")
    assert "no user mallory" in site.fails("import", "mallory", str(root))
    assert "does not exist" in site.fails("import", "alice", str(site.tmp / "missing"))
    notes = site.tmp / "notes.txt"
    notes.write_text("not mail\n")
    assert "not an mbox" in site.fails("import", "alice", str(notes))
    # Another user's id is no id at all.
    site.fails("show", "bob", str(budget))
    site.fails("cat", "bob", str(budget))
    assert "exists" in site.fails("export", "alice", "--output", str(notes))
    usage = site.run("delete", "alice")
    assert usage.exit_code == 2


@pytest.mark.parametrize("fmt", ["mbox", "eml-zip"])
def test_an_export_killed_part_way_finishes_on_the_next_run(site: Site, fmt: str) -> None:
    count = CHECKPOINT_MESSAGES * 6
    source = site.tmp / "big.mbox"
    with source.open("wb") as out:
        for n in range(count):
            out.write(f"From x@example.org Mon Jan  6 09:00:00 2020\nSubject: n{n}\n\n".encode())
            out.write(b"From the body, quoted\n".replace(b"From", b">From") * 3)
            out.write(f"{'filler ' * 200}{n}\n\n".encode())
    importer = site.popbox("import", "alice", str(source))
    stdout, stderr = importer.communicate(timeout=600)
    assert importer.returncode == 0, stderr
    assert f"{count} new" in stdout.decode()

    output = site.tmp / f"out.{fmt}"
    killed = site.popbox("export", "alice", "--format", fmt, "--output", str(output))
    state = state_path(output)
    written = 0
    while written < CHECKPOINT_MESSAGES and killed.poll() is None:
        if state.exists():
            # The state file is replaced whole, never read half-written.
            written = json.loads(state.read_text())["messages"]
        time.sleep(0.002)
    assert killed.poll() is None, "the export ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert state.exists()

    finish = site.popbox("export", "alice", "--format", fmt, "--output", str(output))
    stdout, stderr = finish.communicate(timeout=600)
    assert finish.returncode == 0, stderr
    assert f"{count} messages" in stdout.decode()
    assert "by an earlier run" in stdout.decode()
    assert not state.exists()

    whole = site.tmp / f"whole.{fmt}"
    site.ok("export", "alice", "--format", fmt, "--output", str(whole))
    if fmt == "mbox":
        assert output.read_bytes() == whole.read_bytes()
        return
    with zipfile.ZipFile(output) as resumed, zipfile.ZipFile(whole) as fresh:
        assert resumed.testzip() is None
        assert resumed.namelist() == fresh.namelist()
        assert len(set(resumed.namelist())) == count
        assert all(resumed.read(name) == fresh.read(name) for name in fresh.namelist())
