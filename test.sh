#!/usr/bin/env bash
# Score the test images (and the validation split) with both stages: five-label probabilities, one forward
# pass per batch. Tune fusion on the validation predictions, fuse, write $OUTPUT_DIR/b-submit.txt and
# probabilities.csv, validate the submission; with a labelled test list, print scores and write report.md.
# Extra arguments go to swift's inference arguments for both stages (e.g. --max_pixels 802816).
# With FOLDS > 1 (set in data-pre.sh), each fold's models also score the fold they did not train on, and fusion is
# tuned on those out-of-fold predictions pooled with the validation predictions (tools.oof).
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-outputs}")
FUSION_PARAMS=${FUSION_PARAMS:-}              # fusion JSON to use as is; empty = search on validation

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
load_pipeline
FOLDS=${FOLDS:-1}                             # from pipeline.env (data-pre.sh); 1 = tune fusion on validation only
if (( FOLDS > 1 )); then python -m tools.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS" --check; fi

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
# Fusion is tuned on predictions of images the models did not train on: the validation split's, and with folds
# each fold's models' predictions of their held-out fold too.
tuned_on="the validation split" gold=$OUTPUT_DIR/data/val.txt
probs1=$OUTPUT_DIR/stage1/val_probs.csv probs2=$OUTPUT_DIR/stage2/val_probs.csv
if [[ -z "$FUSION_PARAMS" ]] && (( FOLDS > 1 )); then
  for ((fold = 0; fold < FOLDS; fold++)); do
    for stage in stage1 stage2; do
      checkpoint=$(python -m tools.checkpoint --run-dir "$OUTPUT_DIR/folds/$fold/$stage" --read)
      step "score fold $fold's held-out images with its $stage ($checkpoint)" \
        python -m tools.score \
          --checkpoint "$checkpoint" \
          --dataset "$OUTPUT_DIR/data/folds/$fold/heldout.jsonl" \
          --output "$OUTPUT_DIR/folds/$fold/$stage/heldout_probs.csv" \
          --batch-size "$SCORE_BATCH_SIZE" \
          -- --max_pixels "$MAX_PIXELS" "$@"
    done
  done
  step "pool out-of-fold and validation predictions" python -m tools.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS"
  tuned_on="the out-of-fold and validation predictions" gold=$OUTPUT_DIR/folds/oof_gold.txt
  probs1=$OUTPUT_DIR/folds/oof_stage1.csv probs2=$OUTPUT_DIR/folds/oof_stage2.csv
fi
if [[ -z "$FUSION_PARAMS" && -s "$gold" ]]; then
  FUSION_PARAMS=$OUTPUT_DIR/fusion.json
  step "fusion search on $tuned_on" \
    python -m tools.fusion_search \
      --stage1 "$probs1" \
      --stage2 "$probs2" \
      --gold "$gold" \
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
