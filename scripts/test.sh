#!/usr/bin/env bash
# The whole test suite from nothing: system packages, a virtualenv with popbox and its
# test tools, static checks, then pytest. Tests start every server they use.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-system.sh
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,fast,fuzz]'

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -q "$@"
