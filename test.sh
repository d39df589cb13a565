#!/usr/bin/env bash
# Score the test images (and the validation split) with both stages: five-label probabilities, one forward
# pass per batch. Tune fusion on the validation predictions, fuse, write $OUTPUT_DIR/b-submit.txt and
# probabilities.csv, validate the submission; with a labelled test list, print scores and write report.md.
# Extra arguments go to swift's inference arguments for both stages (e.g. --max_pixels 802816).
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-outputs}")
FUSION_PARAMS=${FUSION_PARAMS:-}              # fusion JSON to use as is; empty = search on validation

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
load_pipeline

start=$SECONDS
for stage in stage1 stage2; do
  checkpoint=$(python -m tools.checkpoint --run-dir "$OUTPUT_DIR/$stage" --read)
  step "score $stage ($checkpoint)" \
    python -m tools.score \
      --checkpoint "$checkpoint" \
      --dataset "$OUTPUT_DIR/data/test.jsonl" --output "$OUTPUT_DIR/$stage/test_probs.csv" \
      --dataset "$OUTPUT_DIR/data/${stage}_val.jsonl" --output "$OUTPUT_DIR/$stage/val_probs.csv" \
      --batch-size "$SCORE_BATCH_SIZE" \
      -- --max_pixels "$MAX_PIXELS" "$@"
done
if [[ -z "$FUSION_PARAMS" && -s "$OUTPUT_DIR/data/val.txt" ]]; then
  FUSION_PARAMS=$OUTPUT_DIR/fusion.json
  step "fusion search on the validation split" \
    python -m tools.fusion_search \
      --stage1 "$OUTPUT_DIR/stage1/val_probs.csv" \
      --stage2 "$OUTPUT_DIR/stage2/val_probs.csv" \
      --gold "$OUTPUT_DIR/data/val.txt" \
      --output "$FUSION_PARAMS"
fi
step "fuse and write submission" \
  python -m tools.predict --output-dir "$OUTPUT_DIR" ${FUSION_PARAMS:+--fusion-params "$FUSION_PARAMS"}
step "validate submission" \
  python -m tools.validate_submission "$OUTPUT_DIR/b-submit.txt" --test-list "$TEST_LIST"
if [[ "${TEST_LABELLED:-0}" == 1 ]]; then
  step "report" python -m tools.report --output-dir "$OUTPUT_DIR"
fi
log "total $((SECONDS - start)) s; submission: $OUTPUT_DIR/b-submit.txt"
