"""The archive benchmark's machinery: the corpus holds what its docstring promises, and
a tiny run of ``python -m bench.archive`` measures both sides and reports every figure.

A corpus without attachments, charsets or threads would make the comparison say
nothing about real mail; a report with a missing figure or a side that searched
nothing would be taken for a result. Nothing here asserts a speed.
"""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import archive, corpus

REPO = Path(__file__).resolve().parents[2]


def _reason_to_skip() -> str | None:
    if shutil.which("notmuch") is None:
        return "notmuch is not installed (scripts/setup-system.sh)"
    probe = subprocess.run(["/usr/bin/python3", "-c", "import notmuch2"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        return "python3-notmuch2 is not installed for the system python3"
    try:
        import popbox.archive.sqlite  # noqa: F401
    except ImportError:
        return "popbox.archive.sqlite is not there yet"
    return None


def test_corpus_is_the_same_bytes_on_every_build(tmp_path: Path) -> None:
    first = corpus.build(tmp_path / "one", 120, log=False)
    second = corpus.build(tmp_path / "two", 120, log=False)
    assert first.messages == second.messages == 120
    for user in corpus.USERS:
        names = [path.name for path in first.files(user)]
        assert names == [path.name for path in second.files(user)]
        for path in first.files(user):
            assert path.read_bytes() == (second.maildir(user) / "cur" / path.name).read_bytes()


def test_corpus_has_the_mix_of_real_mail(tmp_path: Path) -> None:
    built = corpus.build(tmp_path / "mail", 600, log=False)
    kinds: Counter[str] = Counter()
    charsets: Counter[str] = Counter()
    encodings: Counter[str] = Counter()
    by_bytes: Counter[bytes] = Counter()
    attachments: Counter[bytes] = Counter()
    for user in corpus.USERS:
        for path in built.files(user):
            data = path.read_bytes()
            by_bytes[data] += 1
            message = email.message_from_bytes(data, policy=email.policy.default)
            kinds[message.get_content_type()] += 1
            kinds["reply"] += "In-Reply-To" in message
            kinds["list"] += "List-Id" in message
            kinds["encoded subject"] += "=?" in data.split(b"\nSubject: ", 1)[1][:80].decode()
            for part in message.walk():
                assert not part.defects, (path, part.defects)
                if part.get_content_maintype() == "text":
                    charsets[part.get_content_charset() or ""] += 1
                    encodings[part["Content-Transfer-Encoding"]] += 1
                    assert part.get_content()  # decodes in its own charset
                elif part.get_filename():
                    attachments[part.get_payload(decode=True)] += 1
    assert sum(by_bytes.values()) == 600
    assert {"text/plain", "multipart/alternative", "multipart/mixed"} <= set(kinds)
    assert kinds["reply"]
    assert kinds["list"]
    assert kinds["encoded subject"]
    assert {"utf-8", "iso-8859-1", "windows-1252", "iso-2022-jp", "koi8-r"} <= set(charsets)
    assert {"quoted-printable", "base64", "8bit"} <= set(encodings)
    assert max(by_bytes.values()) > 1, "no message delivered to several users"
    assert max(attachments.values()) > 1, "no attachment shared by two messages"
    sizes = [len(data) for data in by_bytes]
    assert min(sizes) < 4096
    assert max(sizes) > 1 << 20


def test_a_tiny_run_reports_every_figure(tmp_path: Path) -> None:
    reason = _reason_to_skip()
    if reason:
        pytest.skip(reason)
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench.archive", "--quick", "--messages", "300", "--reps",
         "2", "--no-doc", "--work", str(tmp_path / "work"), "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    (out,) = results.iterdir()
    report = (out / "report.md").read_text()
    raw = json.loads((out / "results.json").read_text())
    for side in ("popbox", "notmuch"):
        (indexed,) = raw["index"][side]
        assert indexed["messages"] == 300
        assert indexed["seconds"] > 0
        assert raw["octets"][side] > 0
    assert raw["octets"]["maildir"] > 0
    expected_samples = 2 * archive.QUICK_RUNS_PER_ROUND
    for case in archive.cases():
        assert case.label in report
        for side in ("popbox", "notmuch"):
            assert len(raw["latency"][case.key][side]) == expected_samples
        # Both sides searched the same mail: the common words match on both.
        if case.key in ("common", "newest", "attachment", "dates"):
            totals = {side: raw["answers"][case.key][side]["total"]
                      for side in ("popbox", "notmuch")}
            assert min(totals.values()) > 0, (case.key, totals)
    for row in ("indexing, from nothing", "CPU per 1,000 messages", "on disk"):
        line = next(line for line in report.splitlines() if line.startswith(f"| {row}"))
        assert "| - |" not in line, line
    assert "Query target" in report
    assert "the machine was" in report
    # Again on the same notmuch databases: notmuch's queries are measured again, its
    # indexing figures are the first run's, and the report says so.
    again = subprocess.run(
        [sys.executable, "-m", "bench.archive", "--quick", "--messages", "300", "--reps",
         "1", "--no-doc", "--reuse-notmuch", "--work", str(tmp_path / "work"),
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    (second,) = (path for path in results.iterdir() if path != out)
    reused = json.loads((second / "results.json").read_text())
    assert reused["index"]["notmuch"] == raw["index"]["notmuch"]
    assert reused["index"]["popbox"] != raw["index"]["popbox"]
    assert len(reused["latency"]["common"]["notmuch"]) == archive.QUICK_RUNS_PER_ROUND
    assert f"earlier run {out.name}" in (second / "report.md").read_text()
