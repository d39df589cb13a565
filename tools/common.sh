# Shared by the four scripts: the virtual environment, timed and announced steps, paths from tools.task.Layout,
# and the lock that keeps one script per output folder.
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

# gpu_count: the number of NVIDIA GPUs this machine shows (0 without a driver).
gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

# path NAME [ARGS]: a path of the output layout (tools.task.Layout), e.g. `path run_dir stage1 final`.
path() { python -m tools.task --output-dir "$OUTPUT_DIR" "$@"; }

# lock_outputs: hold $OUTPUT_DIR's lock until this script exits (its children included), or stop at once when
# another script holds it: two scripts on one output folder would mix their files.
lock_outputs() {
  local lock owner
  lock=$(path lock_file)
  owner=$(path lock_owner)
  mkdir -p "$OUTPUT_DIR"
  exec 9>>"$lock"
  if ! flock -n 9; then
    log "$OUTPUT_DIR is in use by $(cat "$owner" 2>/dev/null || echo 'another script'): one script per output folder"
    exit 1
  fi
  printf '%s, pid %s, since %s\n' "$(basename "$0")" "$$" "$(date '+%F %T')" > "$owner"
}
