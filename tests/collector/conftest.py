"""Fixtures for collector tests: a real Dovecot, account settings, message helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.config import FetchSettings, fetch_settings_from_dict
from support.dovecot import DovecotServer, start_dovecot
from support.fetch import MakeSettings


@pytest.fixture
def dovecot(tls_files: Any, shared_tmp: Path) -> Iterator[DovecotServer]:
    """A private Dovecot with user alice (password "secret") and an empty Maildir."""
    server = start_dovecot(shared_tmp, tls_files.cert, tls_files.key)
    server.add_user("alice", "secret")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_settings(tmp_path: Path, tls_files: Any, monkeypatch: pytest.MonkeyPatch) -> MakeSettings:
    """Build FetchSettings for one account on the dovecot fixture's server."""
    monkeypatch.setenv("POPBOX_TEST_PASSWORD", "secret")

    def make(
        server: DovecotServer,
        *,
        sinks: list[dict[str, Any]] | None = None,
        **account: Any,
    ) -> FetchSettings:
        entry: dict[str, Any] = {
            "name": "alice",
            "host": "127.0.0.1",
            "port": server.pop3s_port,
            "username": "alice",
            "password_env": "POPBOX_TEST_PASSWORD",
            "ca_file": str(tls_files.ca),
            "tls_server_name": "localhost",
            "sinks": sinks or [{"kind": "maildir", "path": str(tmp_path / "out")}],
        }
        entry.update(account)
        return fetch_settings_from_dict(
            {"state_dir": str(tmp_path / "state"), "accounts": [entry]}, tmp_path
        )

    return make
