"""Helpers for collector tests: sample messages and reading what sinks wrote."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from popbox.collector.config import AccountSettings, FetchSettings

MakeSettings = Callable[..., FetchSettings]


def message(index: int, extra: bytes = b"") -> bytes:
    """A small distinct message, with a dot-leading line to exercise stuffing."""
    return (
        f"From: sender{index}@example.com\nTo: alice@example.com\n"
        f"Subject: message {index}\nMessage-ID: <m{index}@example.com>\n\n"
        f"Body of message {index}.\n.a line that starts with a dot\n".encode()
        + extra
    )


def only_account(settings: FetchSettings) -> AccountSettings:
    [account] = settings.accounts
    return account


def maildir_messages(path: Path) -> list[bytes]:
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (path / sub).iterdir())
