"""Collector test material: sample messages, account settings, popbox.toml files, one poll.

Every collector test describes its accounts the same way: ``account_entry`` gives one
``[[fetch.accounts]]`` entry as a dict (alice on 127.0.0.1 into a Maildir, any field
overridden), which ``fetch_settings`` validates in-process and ``write_fetch_config``
writes as the TOML a `popbox fetch` subprocess reads.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import pytest

from popbox.collector.config import AccountSettings, FetchSettings, fetch_settings_from_dict
from popbox.collector.poll import Poller, PollResult
from popbox.collector.state import StateDB
from support.fakepop import FakePop

# The environment variable the test accounts read their password from.
PASSWORD_ENV: Final = "POPBOX_TEST_PASSWORD"

MakeSettings = Callable[..., FetchSettings]


def message(index: int, extra: bytes = b"") -> bytes:
    """A small distinct message, with a dot-leading line to exercise stuffing."""
    return (
        f"From: sender{index}@example.com\nTo: alice@example.com\n"
        f"Subject: message {index}\nMessage-ID: <m{index}@example.com>\n\n"
        f"Body of message {index}.\n.a line that starts with a dot\n".encode()
        + extra
    )


def crlf_message(index: int) -> bytes:
    """A small distinct message with CRLF line ends, as a POP3 server sends it."""
    return (
        f"From: a@example.com\r\nSubject: fake {index}\r\nMessage-ID: <f{index}@x>\r\n\r\n"
        f"body {index}\r\n.dot line\r\n"
    ).encode()


def only_account(settings: FetchSettings) -> AccountSettings:
    [account] = settings.accounts
    return account


def maildir_messages(path: Path) -> list[bytes]:
    """Every message a Maildir sink wrote, sorted by content."""
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (path / sub).iterdir())


def account_entry(port: int, out: Path, **fields: Any) -> dict[str, Any]:
    """One account: alice (password from PASSWORD_ENV) on 127.0.0.1:``port`` into the
    Maildir ``out``; ``fields`` add or replace keys."""
    entry: dict[str, Any] = {
        "name": "alice",
        "host": "127.0.0.1",
        "port": port,
        "username": "alice",
        "password_env": PASSWORD_ENV,
        "sinks": [{"kind": "maildir", "path": str(out)}],
    }
    entry.update(fields)
    return entry


def tls_fields(ca: Path) -> dict[str, str]:
    """The keys that make an account verify a server certificate from the test CA."""
    return {"ca_file": str(ca), "tls_server_name": "localhost"}


def fetch_settings(directory: Path, *accounts: Mapping[str, Any], **fetch: Any) -> FetchSettings:
    """Validated settings for ``accounts``, state in ``directory``/state."""
    data = {"state_dir": str(directory / "state"), **fetch, "accounts": list(accounts)}
    return fetch_settings_from_dict(data, directory)


def fetch_toml(*accounts: Mapping[str, Any], **fetch: Any) -> str:
    """The ``[fetch]`` section for ``fetch`` keys and ``accounts``, as TOML text.

    A dict value becomes a sub-table (``[fetch.accounts.oauth]``), a list of dicts an
    array of tables (``[[fetch.accounts.sinks]]``); None values are left out.
    """
    lines = ["[fetch]", *_pairs(fetch)]
    for entry in accounts:
        lines += ["", "[[fetch.accounts]]", *_pairs(entry)]
        for key, value in entry.items():
            if isinstance(value, Mapping):
                lines += ["", f"[fetch.accounts.{key}]", *_pairs(value)]
            elif _is_tables(value):
                for table in value:
                    lines += ["", f"[[fetch.accounts.{key}]]", *_pairs(table)]
    return "\n".join(lines) + "\n"


def write_fetch_config(
    path: Path, *accounts: Mapping[str, Any], before: str = "", **fetch: Any
) -> Path:
    """Write a popbox.toml: ``before`` (other sections, as text), then ``[fetch]``."""
    path.write_text(before + fetch_toml(*accounts, **fetch))
    return path


def settings_for(
    server: FakePop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **fields: Any
) -> FetchSettings:
    """Settings for one plain-TCP account "fake" on ``server``, into ``tmp_path``/out."""
    monkeypatch.setenv("FAKE_PASSWORD", "secret")
    plain = {
        "name": "fake",
        "security": "none",
        "allow_plaintext_password": True,
        "password_env": "FAKE_PASSWORD",
    }
    entry = account_entry(server.port, tmp_path / "out", **(plain | fields))
    return fetch_settings(tmp_path, entry)


async def poll(settings: FetchSettings, **poller: Any) -> PollResult:
    """One poll of the settings' only account, with a state DB opened for it and closed."""
    db = StateDB(settings.state_db_path)
    try:
        return await Poller(only_account(settings), settings, db, **poller).run()
    finally:
        db.close()


def _is_tables(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _pairs(table: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} = {_toml_value(value)}"
        for key, value in table.items()
        if value is not None and not isinstance(value, Mapping) and not _is_tables(value)
    ]


def _toml_value(value: object) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool | int | float | str):
        # JSON's strings, numbers and booleans are TOML's too.
        return json.dumps(value)
    raise TypeError(f"no TOML form for {value!r}")


def run_fetch(
    config: Path, rng: random.Random | None, log: list[bytes] | None = None
) -> int | None:
    """Run one `popbox fetch` (password ``secret`` in POPBOX_TEST_PASSWORD); with
    ``rng``, SIGKILL it at a random point (the crash tests). None = killed."""
    env = dict(os.environ, POPBOX_TEST_PASSWORD="secret")
    process = subprocess.Popen(
        [sys.executable, "-m", "popbox", "fetch", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    with process.stderr:
        if rng is None:
            output = process.stderr.read()
            if log is not None:
                log.append(output)
            return process.wait(120)
        # Kill after the k-th delivery plus a few milliseconds (inside the next RETR,
        # sink write or state commit), or for k = 0 at a random time after start.
        target = rng.randrange(0, 6)
        if target == 0:
            time.sleep(rng.uniform(0.05, 0.5))
        else:
            seen = 0
            for line in process.stderr:
                seen += b" delivered account=" in line
                if seen >= target:
                    time.sleep(rng.uniform(0, 0.004))
                    break
        if process.poll() is not None:
            return process.returncode
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        return None


def crash_body(index: int) -> bytes:
    """A message for the kill -9 loops: every fifth one about 300 KiB, so some kills
    land in the middle of a transfer."""
    if index % 5:
        return message(index, b"x" * 76 + b"\n")
    return message(index, (b"y" * 76 + b"\n") * 4000)


def kill_rounds(
    config: Path, rng: random.Random, rounds: int, arrivals: Callable[[], None]
) -> int:
    """``rounds`` runs of `popbox fetch`, each SIGKILLed at a random point; half way
    through, ``arrivals()`` adds mail (it keeps arriving while the collector is being
    killed). Returns how many runs the kill caught still running."""
    killed = 0
    for round_number in range(rounds):
        if round_number == rounds // 2:
            arrivals()
        killed += run_fetch(config, rng) is None
    return killed
