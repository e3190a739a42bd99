"""Config validation, daemon backoff and the fetch command's exit codes."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from popbox.collector.cli import EXIT_ACCOUNT_FAILED, EXIT_CONFIG, EXIT_OK, fetch_command
from popbox.collector.config import fetch_settings_from_dict, load_fetch_settings
from popbox.collector.poll import PollResult
from popbox.collector.scheduler import next_delay
from popbox.errors import ConfigError
from support.fetch import account_entry, write_fetch_config


def account(**extra: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "a",
        "host": "pop.example.com",
        "username": "u",
        "password_env": "P",
        "sinks": [{"kind": "maildir", "path": "mail"}],
    }
    entry.update(extra)
    return entry


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fetch\.accounts\.0\.sinks\.0\.maildir\.colour"):
        fetch_settings_from_dict(
            {"accounts": [account(sinks=[{"kind": "maildir", "path": "m", "colour": 1}])]},
            tmp_path,
        )
    with pytest.raises(ConfigError, match="unique"):
        fetch_settings_from_dict({"accounts": [account(), account()]}, tmp_path)
    with pytest.raises(ConfigError, match="delete_after_days"):
        fetch_settings_from_dict({"accounts": [account(delete="after_days")]}, tmp_path)
    with pytest.raises(ConfigError, match="oauth"):
        fetch_settings_from_dict({"accounts": [account(auth="oauth2")]}, tmp_path)


def test_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    settings = fetch_settings_from_dict({"state_dir": "st", "accounts": [account()]}, tmp_path)
    assert settings.state_db_path == tmp_path / "st" / "fetch.sqlite"
    assert settings.accounts[0].sinks[0].path == tmp_path / "mail"  # type: ignore[union-attr]
    assert settings.accounts[0].effective_port == 995


def test_every_sink_kind_and_oauth_source_validates(tmp_path: Path) -> None:
    sinks = [
        {"kind": "maildir", "path": "m"},
        {"kind": "mbox", "path": "x.mbox"},
        {"kind": "command", "command": "/bin/true"},
        {"kind": "webhook", "url": "https://h/x", "secret_env": "S"},
        {"kind": "lmtp", "socket": "/run/lmtp", "recipients": ["a@b"]},
        {"kind": "smtp", "host": "mx", "recipients": ["a@b"], "tls": "starttls"},
        {"kind": "popbox", "user": "bob"},
    ]
    oauth = {
        "token_source": "client_credentials",
        "tenant": "contoso.onmicrosoft.com",
        "client_id": "id",
        "client_secret_env": "SECRET",
    }
    settings = fetch_settings_from_dict(
        {"accounts": [account(sinks=sinks, auth="oauth2", password_env=None, oauth=oauth)]},
        tmp_path,
    )
    assert [s.kind for s in settings.accounts[0].sinks] == [s["kind"] for s in sinks]
    assert settings.accounts[0].oauth is not None
    assert settings.accounts[0].oauth.effective_scopes() == [
        "https://outlook.office365.com/.default"
    ]


def test_backoff_grows_and_honours_response_codes(tmp_path: Path) -> None:
    settings = fetch_settings_from_dict(
        {"jitter": 0, "max_backoff": 1000, "accounts": [account(interval=300)]}, tmp_path
    )
    acct, rng = settings.accounts[0], random.Random(1)
    ok = PollResult("a")
    assert next_delay(acct, ok, 0, settings, rng) == 300
    failed = PollResult("a", error="boom", error_code="SYS/TEMP")
    delays = [next_delay(acct, failed, n, settings, rng) for n in (1, 2, 3, 10)]
    assert delays == [30, 60, 120, 1000]
    in_use = PollResult("a", error="locked", error_code="IN-USE")
    assert next_delay(acct, in_use, 1, settings, rng) == 15
    delayed = PollResult("a", error="wait", error_code="LOGIN-DELAY", login_delay=1800)
    assert next_delay(acct, delayed, 1, settings, rng) == 1800


def write_config(tmp_path: Path, *accounts: dict[str, object], **fetch: object) -> Path:
    """A popbox.toml with server settings too, as `popbox fetch` finds it in practice."""
    return write_fetch_config(
        tmp_path / "popbox.toml",
        *accounts,
        before="[pop3]\nlisten = []\n\n",
        state_dir=tmp_path / "st",
        **fetch,
    )


# An account nothing answers for, so a fetch fails fast.
UNREACHABLE = account_entry(
    1, Path("m"), name="a", username="u", password_env="NOPE_UNSET", connect_timeout=2
)


def test_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = write_config(tmp_path, bogus=1)
    result = runner.invoke(fetch_command, ["--config", str(bad)])
    assert result.exit_code == EXIT_CONFIG
    assert "fetch.bogus" in result.output
    good = write_config(tmp_path, UNREACHABLE)
    assert runner.invoke(fetch_command, ["--config", str(good), "--account", "zz"]).exit_code == (
        EXIT_CONFIG
    )
    failed = runner.invoke(fetch_command, ["--config", str(good)])
    assert failed.exit_code == EXIT_ACCOUNT_FAILED
    status = runner.invoke(fetch_command, ["--config", str(good), "--status"])
    assert status.exit_code == EXIT_OK
    assert "cannot connect" in status.output
    assert load_fetch_settings(good).accounts[0].name == "a"


def test_fetch_does_not_load_the_server_settings(tmp_path: Path) -> None:
    """cron runs `popbox fetch` every minute; the server's config module is not its."""
    config = write_config(tmp_path, UNREACHABLE)
    probe = (
        "import sys\n"
        "from popbox.cli import main\n"
        "try:\n"
        "    main(['fetch', '--config', sys.argv[1]])\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'popbox.config' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(config)], capture_output=True, text=True, timeout=60
    )
    assert run.stdout.split() == [str(EXIT_ACCOUNT_FAILED), "False"], run.stderr
