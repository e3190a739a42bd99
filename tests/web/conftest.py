"""The web page on a real uvicorn with alice, bob and the admin root, and a few
archived messages of each (tests/support/web.py builds it all from a Config)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from support.web import PASSWORDS, Site, running_site, web_config


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    config = web_config(tmp_path, web={"admins": ["root"]})
    async with running_site(config, users=PASSWORDS) as running:
        yield running
