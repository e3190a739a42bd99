"""Run one fuzz target of targets.py under atheris (libFuzzer), popbox instrumented.

    python tests/fuzz/run_atheris.py TARGET [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import sys

import atheris

# Instrument popbox's modules only (as they are first imported here): instrumenting
# everything loaded costs seconds per start and guides the fuzzer by noise.
with atheris.instrument_imports(include=["popbox", "targets"]):
    import targets


def main() -> None:
    target = targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
