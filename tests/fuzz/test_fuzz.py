"""The fuzz targets in CI: the seed corpus replayed, then a bounded atheris run of each.

Without atheris (it has wheels for CPython on Linux/macOS only), the same targets get
a bounded hypothesis run instead, so a finding is never silently skipped. Longer
runs: bench/fuzz.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from targets import TARGETS

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
# Seconds per target in CI: three targets stay under ~20 s of the suite's budget.
SECONDS_PER_TARGET = int(os.environ.get("POPBOX_FUZZ_SECONDS", "6"))


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_hostile_seed_corpus_is_handled(target: str) -> None:
    """Long lines, NUL, invalid UTF-8, huge numbers, broken base64: no finding."""
    seeds = sorted((CORPUS / target).iterdir())
    assert len(seeds) >= 5
    for seed in seeds:
        TARGETS[target](seed.read_bytes())


@pytest.mark.skipif(not _has_atheris(), reason="atheris not installed (pip install -e .[fuzz])")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bounded_coverage_guided_fuzzing_finds_nothing(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS / target, corpus)
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "run_atheris.py"),
            target,
            f"-max_total_time={SECONDS_PER_TARGET}",
            "-rss_limit_mb=1024",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        timeout=SECONDS_PER_TARGET * 10 + 60,
        check=False,
        cwd=tmp_path,
    )
    output = result.stderr.decode(errors="replace")
    assert result.returncode == 0, output[-4000:]
    assert "Done" in output  # it really ran


@pytest.mark.skipif(_has_atheris(), reason="atheris runs the targets instead")
@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_bounded_random_fuzzing_finds_nothing(target: str, data: bytes) -> None:
    TARGETS[target](data)
