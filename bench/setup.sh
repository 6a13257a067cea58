#!/usr/bin/env bash
# Peers for bench/bench_dispatch.py, in a venv of their own (the project itself needs none).
#
#   bash bench/setup.sh                 # creates/updates $BENCH_VENV (default /opt/atropos-bench-venv)
#   $BENCH_VENV/bin/python bench/bench_dispatch.py [--quick]
#
# Installs atroposlib (Atropos' own ServerManager: ~100 packages, ~1 GB), openai and aiohttp, and
# uvloop for the fast canned-answer server's own loop.  Skipped when the venv already imports all four.  Knobs: BENCH_VENV, BENCH_PYTHON,
# ATROPOSLIB_VERSION (default 0.4.0, the last release; "" = newest).
set -euo pipefail

BENCH_VENV=${BENCH_VENV:-/opt/atropos-bench-venv}
BENCH_PYTHON=${BENCH_PYTHON:-python3}
ATROPOSLIB_VERSION=${ATROPOSLIB_VERSION-0.4.0}

if [[ -x "$BENCH_VENV/bin/python" ]] &&
   "$BENCH_VENV/bin/python" -c "import atroposlib.envs.server_handling.server_manager, openai, aiohttp, uvloop" 2>/dev/null; then
    echo "bench/setup.sh: $BENCH_VENV already has atroposlib, openai, aiohttp and uvloop"
    exit 0
fi

[[ -x "$BENCH_VENV/bin/python" ]] || "$BENCH_PYTHON" -m venv "$BENCH_VENV"
"$BENCH_VENV/bin/python" -m pip install --quiet --upgrade pip
spec="atroposlib${ATROPOSLIB_VERSION:+==$ATROPOSLIB_VERSION}"
"$BENCH_VENV/bin/python" -m pip install "$spec" openai aiohttp uvloop
"$BENCH_VENV/bin/python" - <<'PY'
import importlib.metadata as md
import atroposlib.envs.server_handling.server_manager  # noqa: F401  (fails loudly if broken)
print("bench/setup.sh: ok:", ", ".join(f"{p} {md.version(p)}" for p in ("atroposlib", "openai", "aiohttp", "uvloop")))
PY
