"""Fixtures for collector tests: account settings on the shared Dovecot, an OAuth server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popbox.collector.config import FetchSettings
from support.dovecot import DovecotServer
from support.fetch import PASSWORD_ENV, MakeSettings, account_entry, fetch_settings, tls_fields
from support.oauth import FakeAuthServer, serve_auth


@pytest.fixture
def auth_server() -> Iterator[FakeAuthServer]:
    """A local OAuth2 authorization server over plain HTTP."""
    yield from serve_auth(FakeAuthServer())


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
