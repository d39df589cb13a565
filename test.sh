#!/usr/bin/env bash
# Score the test images (and the validation split) with both stages: five-label probabilities, one forward
# pass per batch. Tune fusion on the validation predictions, fuse, write $OUTPUT_DIR/b-submit.txt and
# probabilities.csv, validate the submission; with a labelled test list, print scores and write report.md.
# Extra arguments go to swift's inference arguments for both stages (e.g. --max_pixels 802816).
# With FOLDS > 1 (set in data-pre.sh), each fold's models also score the fold they did not train on, and fusion is
# tuned on those out-of-fold predictions pooled with the validation predictions (tools.decide.oof).
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-outputs}")
FUSION_PARAMS=${FUSION_PARAMS:-}              # fusion JSON to use as is; empty = search on held-out predictions

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
load_pipeline                                 # pipeline.env, then recipes/$RECIPE.env: SCORE_BATCH_SIZE, MAX_PIXELS
FOLDS=${FOLDS:-1}                             # from pipeline.env (data-pre.sh); 1 = tune fusion on validation only
if (( FOLDS > 1 )); then python -m tools.decide.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS" --check; fi

start=$SECONDS
runs=(final)                                  # final: the submitted models on test + validation
if [[ -z "$FUSION_PARAMS" ]] && (( FOLDS > 1 )); then runs+=(folds); fi   # folds: each fold's models on its fold
step "score with both stages (runs: ${runs[*]})" \
  python -m tools.model.score \
    --output-dir "$OUTPUT_DIR" \
    --runs "${runs[@]}" \
    --batch-size "$SCORE_BATCH_SIZE" \
    -- --max_pixels "$MAX_PIXELS" "$@"
if [[ -z "$FUSION_PARAMS" ]]; then
  if (( FOLDS > 1 )); then
    step "pool out-of-fold and validation predictions" python -m tools.decide.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS"
  fi
  step "fusion search" python -m tools.decide.search --output-dir "$OUTPUT_DIR"
fi
step "fuse and write submission" \
  python -m tools.decide.fuse --output-dir "$OUTPUT_DIR" ${FUSION_PARAMS:+--fusion-params "$FUSION_PARAMS"}
submission=$(path submission)
step "validate submission" python -m tools.decide.validate "$submission" --test-list "$TEST_LIST"
if [[ "${TEST_LABELLED:-0}" == 1 ]]; then
  step "report" python -m tools.report.report --output-dir "$OUTPUT_DIR"
fi
log "total $((SECONDS - start)) s; submission: $submission"
