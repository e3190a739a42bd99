"""The configuration reference in README.md is a valid config: every key it shows exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from popbox.config import config_from_dict

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_block_validates(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md lost its configuration reference"
    config = config_from_dict(tomllib.loads(blocks[0]), tmp_path)
    assert config.pop3.listen == ["0.0.0.0:110"]
    assert config.lmtp.domains == ["example.org"]
