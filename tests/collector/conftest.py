"""Fixtures for collector tests: a real Dovecot, account settings, message helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.config import FetchSettings
from support.dovecot import DovecotServer, start_dovecot
from support.fetch import PASSWORD_ENV, MakeSettings, account_entry, fetch_settings, tls_fields


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
    monkeypatch.setenv(PASSWORD_ENV, "secret")

    def make(
        server: DovecotServer,
        *,
        sinks: list[dict[str, Any]] | None = None,
        **account: Any,
    ) -> FetchSettings:
        entry = account_entry(server.pop3s_port, tmp_path / "out", **tls_fields(tls_files.ca))
        if sinks:
            entry["sinks"] = sinks
        entry.update(account)
        return fetch_settings(tmp_path, entry)

    return make
