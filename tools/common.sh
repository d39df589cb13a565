# Shared by the four scripts: the virtual environment, timed and announced steps, the recorded pipeline settings,
# and paths from tools.task.Layout.
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

# path NAME [ARGS]: a path of the output layout (tools.task.Layout), e.g. `path run_dir stage1 final`.
path() { python -m tools.task --output-dir "$OUTPUT_DIR" "$@"; }

# load_pipeline: the recipe and models that data-pre.sh recorded, then that recipe's defaults.
load_pipeline() {
  local env_file
  env_file=$(path pipeline_env)
  [[ -f "$env_file" ]] || { log "no $env_file: run data-pre.sh first"; exit 1; }
  # shellcheck disable=SC1090
  source "$env_file"
  # shellcheck disable=SC1090
  source "recipes/${RECIPE:-real}.env"
  export MAX_PIXELS
}
