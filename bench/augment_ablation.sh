#!/usr/bin/env bash
# Augmentation off vs on, on the demo: the whole pipeline twice with the same seed and demo data (AUGMENT=0,
# then AUGMENT=1), each in its own output folder, one shared demo model cache; then a Markdown table of
# stage-1 (and fused) weighted F1 and 高风险 F1 on the labelled demo test set (tools.report.ablation).
#   bash bench/augment_ablation.sh                                                  # the README comparison
#   DEMO_QUICK=1 DEMO_TRAIN=60 DEMO_TEST=20 STAGES=stage1 bash bench/augment_ablation.sh   # plumbing check
# Every data-pre.sh/train.sh knob applies to both runs (SEED, DEMO_*, AUGMENT_FILTER, EPOCHS_STAGE1, ...).
set -euo pipefail

ABLATION_DIR=$(realpath -m "${ABLATION_DIR:-outputs/ablation}")   # runs go to augment0/ and augment1/
STAGES=${STAGES:-stage1 stage2}               # stage1 alone: no stage 2, no fusion (the stage-1 columns only)
export SEED=${SEED:-42}
export DEMO_DATA_DIR DEMO_MODELS_DIR
DEMO_DATA_DIR=$(realpath -m "${DEMO_DATA_DIR:-$ABLATION_DIR/demo}")  # its own copy: data/demo stays as it is
DEMO_MODELS_DIR=$(realpath -m "${DEMO_MODELS_DIR:-.cache/demo-models}")
unset DATA_DIR AUGMENT OUTPUT_DIR

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/common.sh

for aug in 0 1; do
  out=$ABLATION_DIR/augment$aug
  rm -rf "$out"  # a stage-1 checkpoint left from an earlier run would change the AUGMENT=1 filter
  AUGMENT=$aug OUTPUT_DIR=$out bash data-pre.sh
  run_start=$SECONDS  # train and score (data-pre.sh may include building the demo models)
  OUTPUT_DIR=$out STAGES=$STAGES ALLOW_STALE=1 bash train.sh   # stage 1 alone: no stage 2 to keep current
  if [[ " $STAGES " == *" stage2 "* && " $STAGES " == *" stage1 "* ]]; then
    OUTPUT_DIR=$out bash test.sh
  else  # stage 1 only: score the test set exactly as test.sh does for stage 1
    (
      OUTPUT_DIR=$out
      source recipes/demo.env                 # SCORE_BATCH_SIZE, MAX_PIXELS
      export MAX_PIXELS
      python -m tools.model.score \
        --checkpoint "$(python -m tools.model.checkpoint read --output-dir "$out" --stage stage1)" \
        --dataset "$(path test_jsonl)" --output "$(path probs stage1 test)" \
        --batch-size "$SCORE_BATCH_SIZE" \
        -- --max_pixels "$MAX_PIXELS"
    )
  fi
  printf '{"seconds": %d}\n' "$((SECONDS - run_start))" > "$out/ablation.json"
done
python -m tools.report.ablation "off=$ABLATION_DIR/augment0" "on=$ABLATION_DIR/augment1" \
  | tee "$ABLATION_DIR/table.md"
log "table: $ABLATION_DIR/table.md"
