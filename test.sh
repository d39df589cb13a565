#!/usr/bin/env bash
# Score every test image with both stages (five-label probabilities, one forward pass per batch), fuse them,
# write $OUTPUT_DIR/b-submit.txt and probabilities.csv; with a labelled test list, print the scores.
# Extra arguments go to swift's inference arguments for both stages (e.g. --max_pixels 802816).
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-outputs}")
FUSION_PARAMS=${FUSION_PARAMS:-}              # fusion JSON; default $OUTPUT_DIR/fusion.json if present

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
[[ -f "$OUTPUT_DIR/pipeline.env" ]] || { log "no $OUTPUT_DIR/pipeline.env: run data-pre.sh first"; exit 1; }
source "$OUTPUT_DIR/pipeline.env"
source "recipes/${RECIPE:-real}.env"
export MAX_PIXELS

start=$SECONDS
for stage in stage1 stage2; do
  checkpoint=$(python -m tools.checkpoint --run-dir "$OUTPUT_DIR/$stage" --read)
  step "score $stage ($checkpoint)" \
    python -m tools.score \
      --checkpoint "$checkpoint" \
      --dataset "$OUTPUT_DIR/data/test.jsonl" \
      --output "$OUTPUT_DIR/$stage/test_probs.csv" \
      --batch-size "$SCORE_BATCH_SIZE" \
      -- --max_pixels "$MAX_PIXELS" "$@"
done
step "fuse and write submission" \
  python -m tools.predict --output-dir "$OUTPUT_DIR" ${FUSION_PARAMS:+--fusion-params "$FUSION_PARAMS"}
log "total $((SECONDS - start)) s; submission: $OUTPUT_DIR/b-submit.txt"
