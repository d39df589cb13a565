#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with this project and its pinned stack (ms-swift 4.6,
# torch + torchvision, transformers, peft). Same command on CPU-only and CUDA machines. Idempotent: a second
# run only checks that pyproject.toml has not changed since the last install.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}                         # e.g. "--index-url ..." for a mirror

cd "$(dirname "${BASH_SOURCE[0]}")"
log() { printf '[init.sh] %s\n' "$*"; }
start=$SECONDS

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.firesafe-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  log "dependencies up to date ($VENV)"
else
  log "installing the project and its dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet $PIP_ARGS -e ".[test]"
  echo "$want" > "$stamp"
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
for name in ("ms-swift", "torch", "torchvision", "transformers", "peft", "trl", "qwen-vl-utils"):
    print(f"  {name:<14} {md.version(name)}")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
print(f"  GPU            {gpu}")
PY
log "ready in $((SECONDS - start)) s; next: bash data-pre.sh"
