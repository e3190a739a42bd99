"""`popbox import` on damaged sources: every message decided, reported, and a rerun
changes nothing; and each refusal with its message and exit code."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from popbox.cli import main
from popbox.fileio import FileLock
from popbox.migrate.apply import MAPPING_NAME
from popbox.store.maildrop import LOCK_NAME


def setup(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "popbox.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "passwd").write_text("alice:{PLAIN}x::::::\n")
    old = tmp_path / "old"
    for sub in ("cur", "new", "tmp"):
        (old / sub).mkdir(parents=True)
    for number in range(1, 6):
        (old / "cur" / f"{100 + number}.m{number}.host:2,S").write_bytes(
            f"Subject: {number}\r\n\r\nbody {number}\r\n".encode()
        )
    (old / "dovecot-uidlist").write_text(
        "3 V1700000000 N9 G0\n"
        "1 Pdup :101.m1.host\n"
        "2 Pdup :102.m2.host\n"
        f"3 P{'y' * 80} :103.m3.host\n"
        "this line is broken\n"
        "5 :105.m5.host\n"
    )
    return config, old


def run(config: Path, *args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(main, ["import", *args, "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    data: list[dict[str, object]] = json.loads(result.output)
    return data


def decisions(report: list[dict[str, object]]) -> list[tuple[str, str | None]]:
    folder = report[0]["folders"][0]  # type: ignore[index]
    return [(m["decision"], m["uidl"]) for m in folder["messages"]]  # type: ignore[index]


def test_copy_from_a_damaged_dovecot_maildir_reports_and_resumes(tmp_path: Path) -> None:
    config, old = setup(tmp_path)
    args = ("dovecot", "--user", "alice", "--maildir", str(old), "--copy")
    dry = run(config, *args, "--dry-run")
    planned = decisions(dry)
    assert planned[0] == ("kept", "dup")
    assert planned[1] == ("rewritten", "dup-2")
    assert planned[2][0] == "rewritten"
    assert len(planned[2][1] or "") <= 70
    assert planned[3] == ("kept", "000000056553f100")
    # 104 was on the broken line: never trusted, listed last with a UIDL of its own.
    assert planned[4][0] == "new"
    assert (planned[4][1] or "").startswith("n")
    assert any("line 5" in p for p in dry[0]["folders"][0]["problems"])  # type: ignore[index]
    inbox = tmp_path / "data" / "mail" / "alice"
    assert not inbox.exists()  # a dry run writes nothing

    first = run(config, *args)
    assert first[0]["folders"][0]["stored"] == 5  # type: ignore[index]
    mapping = (inbox / MAPPING_NAME).read_text()
    assert "\tdup\tdup-2\t" in mapping
    again = run(config, *args)
    assert again[0]["folders"][0]["stored"] == 0  # type: ignore[index]
    assert again[0]["folders"][0]["already"] == 5  # type: ignore[index]
    assert decisions(again) == planned
    assert sum(1 for sub in ("new", "cur") for _ in (inbox / sub).iterdir()) == 5


def test_in_place_needs_the_users_own_maildir(tmp_path: Path) -> None:
    config, old = setup(tmp_path)
    result = CliRunner().invoke(
        main,
        ["import", "dovecot", "--user", "alice", "--maildir", str(old), "--config", str(config)],
    )
    assert result.exit_code == 1
    assert "--copy" in result.output


def invoke(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["import", *args, "--config", str(config)])


def test_an_unknown_user_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    config, old = setup(tmp_path)
    result = invoke(config, "dovecot", "--user", "bob", "--maildir", str(old), "--copy")
    assert result.exit_code == 1
    assert "no user bob" in result.output
    assert "add them first" in result.output
    assert not (tmp_path / "data" / "mail").exists()


def test_user_and_all_together_or_neither_is_a_usage_error(tmp_path: Path) -> None:
    config, _old = setup(tmp_path)
    for args in ((), ("--user", "alice", "--all")):
        result = invoke(config, "courier", *args)
        assert result.exit_code == 2
        assert "exactly one of --user USER and --all" in result.output


def test_a_source_that_is_not_a_maildir_is_refused(tmp_path: Path) -> None:
    config, _old = setup(tmp_path)
    result = invoke(config, "x-uidl", "--user", "alice", "--maildir", str(tmp_path), "--copy")
    assert result.exit_code == 1
    assert f"refused: {tmp_path} is not a Maildir" in result.output


def test_a_list_that_is_there_but_unreadable_refuses_the_user(tmp_path: Path) -> None:
    # Read as "no list", every message would be copied with a UIDL of its own, and a
    # second run once the list is readable would copy each one again.
    config, old = setup(tmp_path)
    (old / "dovecot-uidlist").unlink()
    (old / "dovecot-uidlist").mkdir()  # unreadable for root too
    args = ("dovecot", "--user", "alice", "--maildir", str(old), "--copy")
    result = invoke(config, *args)
    assert result.exit_code == 1
    assert "dovecot-uidlist cannot be read" in result.output
    assert "nothing imported" in result.output
    assert not (tmp_path / "data" / "mail" / "alice").exists()
    report = json.loads(invoke(config, *args, "--json", "--dry-run").output)
    assert "cannot be read" in report[0]["refusal"]


def test_a_folder_in_use_stops_the_import_with_what_to_do(tmp_path: Path) -> None:
    config, old = setup(tmp_path)
    inbox = tmp_path / "data" / "mail" / "alice"
    inbox.mkdir(parents=True)
    for sub in ("cur", "new", "tmp"):
        (inbox / sub).mkdir()
    with FileLock(inbox / LOCK_NAME):  # as a POP3 session holds it
        for args in (("--maildir", str(old), "--copy"), ("--maildir", str(inbox))):
            result = invoke(config, "courier", "--user", "alice", *args)
            assert result.exit_code == 1, result.output
            assert "in use" in result.output or "locked" in result.output
            assert "run the import again once it is free" in result.output
    assert not list((inbox / "new").iterdir())
    assert not (inbox / "popbox.uidls").exists()
