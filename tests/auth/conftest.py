"""Fixtures for the auth tests: cheap hash costs and passwd files with safe modes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from popbox.auth.schemes import HashCost
from support.auth import CHEAP, WritePasswd


@pytest.fixture
def cheap() -> HashCost:
    return CHEAP


@pytest.fixture
def write_passwd(tmp_path: Path) -> WritePasswd:
    """Write text to a 0600 passwd file (replacing it, as admin tools do) and return it."""
    path = tmp_path / "passwd"
    counter = 0

    def write(text: str) -> Path:
        nonlocal counter
        counter += 1
        tmp = tmp_path / f".passwd.{counter}"
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return path

    return write
