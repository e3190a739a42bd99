#!/usr/bin/env bash
# Sets up popbox in ./.venv and runs it on the embedded default: Maildirs, users and a
# self-signed certificate under ./popbox-data; POP3 on 127.0.0.1:1110 (STLS) and
# 127.0.0.1:1995 (TLS), LMTP on 127.0.0.1:2424, the archive's web page on
# http://127.0.0.1:8080/. Extra arguments go to `popbox serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[fast]'
exec .venv/bin/popbox serve "$@"
