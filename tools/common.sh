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

# load_pipeline: the recipe and models that data-pre.sh recorded, then that recipe's defaults.
load_pipeline() {
  [[ -f "$OUTPUT_DIR/pipeline.env" ]] || { log "no $OUTPUT_DIR/pipeline.env: run data-pre.sh first"; exit 1; }
  # shellcheck disable=SC1090,SC1091
  source "$OUTPUT_DIR/pipeline.env"
  # shellcheck disable=SC1090
  source "recipes/${RECIPE:-real}.env"
  export MAX_PIXELS
}
