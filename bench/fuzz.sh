#!/usr/bin/env bash
# Longer coverage-guided fuzzing of popbox's parsers than CI's few seconds a target:
#   bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default 600 s, all targets)
# New inputs that reach new code are kept in bench/results/fuzz/TARGET (gitignored);
# crashes land there as crash-*; copy interesting ones into tests/fuzz/corpus/TARGET.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(commands sasl client)
fi
.venv/bin/python -c 'import atheris' 2>/dev/null || .venv/bin/python -m pip install -q -e '.[fuzz]'
for target in "${targets[@]}"; do
    work="bench/results/fuzz/$target"
    mkdir -p "$work"
    echo "fuzzing $target for ${seconds}s (corpus $work, seeds tests/fuzz/corpus/$target)"
    .venv/bin/python tests/fuzz/run_atheris.py "$target" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="$work/" "$work" "tests/fuzz/corpus/$target"
done
