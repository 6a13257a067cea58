#!/usr/bin/env bash
# A venv with Atropos (atroposlib 0.4.0 from PyPI) for tests/test_atropos_envs.py.
#
#   bash tests/atropos/setup.sh            # creates or completes $ATROPOS_VENV; a no-op when it is complete
#   $ATROPOS_VENV/bin/python -m pytest -q -p no:cacheprovider tests/test_atropos_envs.py
#
# The runtime (atropos_slurm.py) needs none of this: the venv holds the peer we test against.
# Pins: tests/atropos/constraints.txt (the whole resolved set, made with `pip freeze`).
# transformers stays on 4.x: Atropos' environments were written for it (5.x returns a dict from
# apply_chat_template(tokenize=True)).  No torch: atroposlib imports none for BaseEnv,
# ServerManager and its servers, and transformers' tokenizers work without it.
#
# Measured on the 2-core CI machine (shared, load 4-6): 114-148 s for a fresh venv (135 s with
# pip's cache off), 101 packages, 1.0 GB; 8.5 s when the venv is already complete.
#
# Knobs: ATROPOS_VENV (default /opt/atropos-env-venv), ATROPOS_PYTHON (a Python >= 3.10;
# default: PYENV_VERSION=3.11.7 python, else python3.11, else python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ATROPOS_VENV=${ATROPOS_VENV:-/opt/atropos-env-venv}
PY="$ATROPOS_VENV/bin/python"

log() { printf '[atropos-setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# What the tests import; also proves transformers is 4.x and torch is absent.
venv_ok() {
  [ -x "$PY" ] && HF_HUB_OFFLINE=1 "$PY" - <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, importlib.util
import atroposlib.envs.base, atroposlib.envs.server_handling.server_manager  # noqa: F401
import openai, pytest, tokenizers, transformers, wandb  # noqa: F401
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
assert md.version("atroposlib") == "0.4.0"
assert transformers.__version__.startswith("4."), transformers.__version__
assert importlib.util.find_spec("torch") is None
PYEOF
}

t0=$(date +%s.%N)
if venv_ok; then
  log "$ATROPOS_VENV already has atroposlib 0.4.0, transformers 4.x, pytest (no torch); nothing to do"
  exit 0
fi

if [ -z "${ATROPOS_PYTHON:-}" ]; then
  if PYENV_VERSION=3.11.7 python -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    base_py=(env PYENV_VERSION=3.11.7 python)
  elif command -v python3.11 >/dev/null 2>&1; then
    base_py=(python3.11)
  else
    base_py=(python3)
  fi
else
  base_py=("$ATROPOS_PYTHON")
fi
"${base_py[@]}" -c 'import sys; assert sys.version_info >= (3, 10)' \
  || die "atroposlib 0.4.0 needs Python >= 3.10; set ATROPOS_PYTHON"

if [ ! -x "$PY" ]; then
  log "creating $ATROPOS_VENV with ${base_py[*]}"
  "${base_py[@]}" -m venv "$ATROPOS_VENV"
fi
log "pip install atroposlib==0.4.0 'transformers<5' pytest (constraints: $HERE/constraints.txt)"
# (The grep drops pip's warnings about this machine's local index mirrors lacking a package.)
if ! "$PY" -m pip install --quiet --disable-pip-version-check --constraint "$HERE/constraints.txt" \
    'atroposlib==0.4.0' 'transformers<5' pytest 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }; then
  die "pip install failed (network, or a pin in $HERE/constraints.txt no longer on the index?)"
fi
venv_ok || die "the venv does not import atroposlib/transformers 4.x/pytest (or has torch); try: $PY -c 'import atroposlib.envs.base'"
log "done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s;" \
    "$("$PY" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("atroposlib", "transformers", "openai", "wandb")))');" \
    "venv size $(du -sh "$ATROPOS_VENV" | cut -f1)"
