# Shared by the four scripts: the virtual environment and timed, announced steps.
# shellcheck shell=bash
VENV=${VENV:-.venv}
if [[ -f "$VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*"; }

# step NAME CMD...: run CMD, then print how long it took.
step() {
  local name=$1 start=$SECONDS
  shift
  log "$name ..."
  "$@"
  log "$name done in $((SECONDS - start)) s"
}
