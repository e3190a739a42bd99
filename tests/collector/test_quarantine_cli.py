"""`popbox fetch --quarantine`, `--retry-quarantined ID` and `--forget-quarantined ID`
against a real Dovecot, with a command sink that refuses some messages for good."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from popbox.collector.cli import EXIT_CONFIG, EXIT_OK, fetch_command
from popbox.collector.quarantine import quarantine_id
from support.dovecot import DovecotServer
from support.fetch import PASSWORD_ENV, account_entry, message, tls_fields, write_fetch_config

pytestmark = pytest.mark.interop

# Takes a message into OUT/UIDL, unless it says "poison" while REFUSE exists.
SINK = """#!/bin/sh
OUT={out}
REFUSE={refuse}
data=$(cat)
case "$data" in
  *poison*) if [ -e "$REFUSE" ]; then echo "poison refused" >&2; exit 1; fi ;;
esac
printf '%s' "$data" > "$OUT/$POPBOX_UIDL"
"""


@pytest.fixture
def setup(
    dovecot: DovecotServer, tls_files: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, Path]:
    monkeypatch.setenv(PASSWORD_ENV, "secret")
    out, refuse, script = tmp_path / "out", tmp_path / "refuse", tmp_path / "sink.sh"
    out.mkdir()
    refuse.touch()
    script.write_text(SINK.format(out=out, refuse=refuse))
    script.chmod(0o755)
    sink = {
        "kind": "command",
        "command": str(script),
        "env": {"OUT": str(out), "REFUSE": str(refuse)},
    }
    account = account_entry(dovecot.pop3s_port, out, **tls_fields(tls_files.ca), sinks=[sink])
    config = write_fetch_config(tmp_path / "popbox.toml", account, state_dir=tmp_path / "state")
    for index in range(4):
        dovecot.add_message("alice", message(index, b"poison\n" if index in (1, 3) else b""))
    return config, out, refuse


def fetch(config: Path, *args: str) -> Any:
    return CliRunner().invoke(fetch_command, ["--config", str(config), *args])


def test_list_retry_one_and_forget_by_id(setup: tuple[Path, Path, Path]) -> None:
    config, out, refuse = setup
    assert fetch(config).exit_code == EXIT_OK
    assert len(list(out.iterdir())) == 2

    listed = fetch(config, "--quarantine")
    assert listed.exit_code == EXIT_OK
    rows = [line.split("\t") for line in listed.output.splitlines()]
    assert len(rows) == 2
    for qid, account, uidl, reason, size, when in rows:
        assert qid == quarantine_id(uidl)
        assert account == "alice"
        assert "poison refused" in reason
        assert int(size) > 0
        assert when.endswith("Z")
    as_json = json.loads(fetch(config, "--quarantine", "--json").output)
    assert [(m["id"], m["uidl"]) for m in as_json] == [(r[0], r[2]) for r in rows]
    assert all(Path(m["path"]).read_bytes().count(b"poison") == 1 for m in as_json)

    # The sink is fixed; only the message named by ID is offered again.
    refuse.unlink()
    (first, _, first_uidl, *_), (second, _, second_uidl, *_) = rows
    assert fetch(config, "--retry-quarantined", first).exit_code == EXIT_OK
    assert (out / first_uidl).exists()
    assert not (out / second_uidl).exists()
    assert [line.split("\t")[0] for line in fetch(config, "--quarantine").output.splitlines()] == [
        second
    ]

    unknown = fetch(config, "--retry-quarantined", "0123456789ab")
    assert unknown.exit_code == EXIT_CONFIG
    assert "0123456789ab" in unknown.output
    assert fetch(config, "--retry-quarantined", "alice/" + first).exit_code == EXIT_CONFIG

    # Forgotten: out of the quarantine, never offered again, even by a retry of all.
    forgot = fetch(config, "--forget-quarantined", "alice/" + second[:8])
    assert forgot.exit_code == EXIT_OK
    assert fetch(config, "--quarantine").output == ""
    assert fetch(config, "--retry-quarantined").exit_code == EXIT_OK
    assert not (out / second_uidl).exists()
    assert not list((config.parent / "state" / "quarantine" / "alice").glob("*.eml"))
