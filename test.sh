#!/usr/bin/env bash
# Score the test images (and the validation split) with both stages: five-label probabilities, one forward
# pass per batch. Tune fusion on the validation predictions, fuse, write $OUTPUT_DIR/b-submit.txt and
# probabilities.csv, validate the submission; with a labelled test list, print scores and write report.md.
# Extra arguments go to swift's inference arguments for both stages (e.g. --max_pixels 802816).
# The models must have trained on the data data-pre.sh prepared last (ALLOW_STALE=1 to override). Scoring keeps
# finished files and continues an interrupted one, so running test.sh again after Ctrl-C loses no work.
# With FOLDS > 1 (set in data-pre.sh), each fold's models also score the fold they did not train on, and fusion is
# tuned on those out-of-fold predictions pooled with the validation predictions (tools.decide.oof).
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-$(dirname "${BASH_SOURCE[0]}")/outputs}")  # default: outputs/ beside the scripts
FUSION_PARAMS=${FUSION_PARAMS:-}              # fusion JSON to use as is; empty = search on held-out predictions
DECISIONS=${DECISIONS:-f1}                    # f1: start fusion from the offsets that maximise the expected weighted F1 | argmax
ALLOW_STALE=${ALLOW_STALE:-0}                 # 1: score with models trained on other data than data-pre.sh's last run
export PRIOR_CORRECTION=${PRIOR_CORRECTION:-1}  # 1: each model's probabilities corrected to the data's class shares
export SCORE_MERGE=${SCORE_MERGE:-auto}       # LoRA folded into the weights: auto = bf16/fp16 on a GPU | 0 | 1
export SCORE_COMPILE_LLM=${SCORE_COMPILE_LLM:-auto}  # compiled language-model layers: auto = GPU, image sizes of >= 800 images | 0 | 1
export SCORE_FP8=${SCORE_FP8:-0}              # 1: float8 language-model layers (Ada/Hopper; rounds more: bench/README.md)
export SCORE_TTA=${SCORE_TTA:-0}              # flip: average each image's probabilities with its mirror image's (2x time)
export SCORE_PREFETCH=${SCORE_PREFETCH:-1}    # 1: read each model's weight files ahead (a cold page cache loads faster) | 0
[[ -n "$FUSION_PARAMS" ]] && FUSION_PARAMS=$(realpath -m "$FUSION_PARAMS")

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
# What data-pre.sh recorded (the environment wins), read as plain values: nothing in it runs as shell code.
{ IFS= read -r -d '' recorded_recipe && IFS= read -r -d '' recorded_model1 && IFS= read -r -d '' recorded_model2 \
    && IFS= read -r -d '' recorded_test_list && IFS= read -r -d '' recorded_labelled && IFS= read -r -d '' recorded_folds \
    && IFS= read -r -d '' recorded_stage2_target
} < <(python -m tools.state --output-dir "$OUTPUT_DIR" settings)
RECIPE=${RECIPE:-$recorded_recipe}
TEST_LIST=$recorded_test_list                 # the official list: the submission is checked against it
FOLDS=${FOLDS:-$recorded_folds}               # 1 = tune fusion on validation only
# shellcheck disable=SC1090
source "recipes/$RECIPE.env"                  # SCORE_BATCH_SIZE, MAX_PIXELS
export MAX_PIXELS                             # swift caps qwen_vl_utils' resize by it (tools/data/images.py)
python -m tools.knobs ALLOW_STALE="$ALLOW_STALE" PRIOR_CORRECTION="$PRIOR_CORRECTION" DECISIONS="$DECISIONS" FOLDS="$FOLDS" SCORE_BATCH_SIZE="$SCORE_BATCH_SIZE" \
  MAX_PIXELS="$MAX_PIXELS" SCORE_MERGE="$SCORE_MERGE" SCORE_COMPILE_LLM="$SCORE_COMPILE_LLM" SCORE_FP8="$SCORE_FP8" \
  SCORE_TTA="$SCORE_TTA" SCORE_PREFETCH="$SCORE_PREFETCH"
# --- several GPUs (issue 16): one scoring process per visible GPU (SCORE_GPUS=all, or at most N), each scoring its
# share of every dataset, merged in list order (tools/model/shards.py); one GPU or none: as before, in one process
export SCORE_GPUS=${SCORE_GPUS:-all}
python -m tools.knobs SCORE_GPUS="$SCORE_GPUS"
if (( $(gpu_count) > 1 )); then log "several GPUs visible: scoring with SCORE_GPUS=$SCORE_GPUS, one process per GPU"; fi
# --- end several GPUs
lock_outputs                                  # one script per output folder
if (( FOLDS > 1 )); then python -m tools.decide.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS" --check; fi

start=$SECONDS
runs=(final)                                  # final: the submitted models on test + validation
if [[ -z "$FUSION_PARAMS" ]] && (( FOLDS > 1 )); then runs+=(folds); fi   # folds: each fold's models on its fold
python -m tools.state --output-dir "$OUTPUT_DIR" models --runs "${runs[*]}" --allow-stale "$ALLOW_STALE"
step "score with both stages (runs: ${runs[*]}; finished files are kept)" \
  python -m tools.model.score \
    --output-dir "$OUTPUT_DIR" \
    --runs "${runs[@]}" \
    --batch-size "$SCORE_BATCH_SIZE" \
    -- --max_pixels "$MAX_PIXELS" "$@"
if [[ -z "$FUSION_PARAMS" ]]; then
  if (( FOLDS > 1 )); then
    step "pool out-of-fold and validation predictions" python -m tools.decide.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS"
  fi
  step "fusion search" python -m tools.decide.search --output-dir "$OUTPUT_DIR" --decisions "$DECISIONS"
fi
step "fuse and write submission" \
  python -m tools.decide.fuse --output-dir "$OUTPUT_DIR" ${FUSION_PARAMS:+--fusion-params "$FUSION_PARAMS"}
submission=$(path submission)
step "validate submission" python -m tools.decide.validate "$submission" --test-list "$TEST_LIST"
if [[ "$recorded_labelled" == 1 ]]; then
  step "report" python -m tools.report.report --output-dir "$OUTPUT_DIR"
fi
log "total $((SECONDS - start)) s; submission: $submission"
