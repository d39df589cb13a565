#!/usr/bin/env bash
# Prepare the data in three steps, each writing only its own files (tools.task.Layout):
#   1. validate the lists, prepare every image once (upright, RGB, at the model's size), split train/validation
#      by label, deal the folds  (tools.data.prepare)
#   2. augment the training split, filter the copies with a model (VL-ADAS, docs/augmentation.md)  (tools.augment.run)
#   3. compose both stages' training sets, write swift JSONL and the manifest  (tools.compose.stage_sets)
# With no DATA_DIR, builds the embedded demo first (synthetic corridors + tiny pre-trained models, cached).
#   bash data-pre.sh
#   DATA_DIR=/data/ele MODEL_STAGE1=Qwen/Qwen2.5-VL-7B-Instruct MODEL_STAGE2=Qwen/Qwen2.5-VL-3B-Instruct bash data-pre.sh
# Extra arguments go to tools.data.prepare (python -m tools.data.prepare --help), e.g. --test-list /data/ele/A.txt.
set -euo pipefail

DATA_DIR=${DATA_DIR:-}                        # competition data (train.txt, train/, B.txt, B/); empty = demo
OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-$(dirname "${BASH_SOURCE[0]}")/outputs}")  # default: outputs/ beside the scripts
MODEL_STAGE1=${MODEL_STAGE1:-}                # id or folder; default: the recipe's (demo: tiny model)
MODEL_STAGE2=${MODEL_STAGE2:-}
VAL_RATIO=${VAL_RATIO:-0.1}
SEED=${SEED:-42}
FOLDS=${FOLDS:-1}                             # k > 1: also k folds of the training split, for out-of-fold fusion tuning
SKIP_BAD_IMAGES=${SKIP_BAD_IMAGES:-0}         # 1: leave unreadable training images out (listed) instead of stopping
# Stage-set composition (empty = tools.compose.stage_sets' defaults, in its --help)
STAGE1_MIN_SHARE=${STAGE1_MIN_SHARE:-}        # stage 1 repeats rare labels up to this share of its rows
STAGE2_HIGH_REPEAT=${STAGE2_HIGH_REPEAT:-}    # stage 2 rows per 高风险 image (augmented copies first)
STAGE2_OTHER_RATIO=${STAGE2_OTHER_RATIO:-}    # stage 2 低/无/非 images, as a multiple of the 高风险 count
STAGE2_TARGET=${STAGE2_TARGET:-five}          # what the specialist answers: five labels | binary (高风险 vs 非高风险)
DEMO_DATA_DIR=$(realpath -m "${DEMO_DATA_DIR:-$(dirname "${BASH_SOURCE[0]}")/data/demo}")
DEMO_MODELS_DIR=$(realpath -m "${DEMO_MODELS_DIR:-$(dirname "${BASH_SOURCE[0]}")/.cache/demo-models}")
DEMO_SEED=${DEMO_SEED:-0}
DEMO_TRAIN=${DEMO_TRAIN:-600}                 # demo training images
DEMO_TEST=${DEMO_TEST:-300}                   # demo test images (labelled)
DEMO_QUICK=${DEMO_QUICK:-0}                   # 1 = barely pre-trained demo models (plumbing tests only)
AUGMENT=${AUGMENT:-1}                         # 0 = no augmentation (the split and repeats only)
AUGMENT_FILTER=${AUGMENT_FILTER:-auto}        # consistency filter: auto (demo, or a GPU), 1 always, 0 never
AUGMENT_FILTER_RATIO=${AUGMENT_FILTER_RATIO:-0.5}
AUGMENT_MULTIPLIERS=${AUGMENT_MULTIPLIERS:-}  # extra copies per original, e.g. 高风险=10,非楼道=4 (empty = these)
AUGMENT_INSERT=${AUGMENT_INSERT:-}            # hazard-insertion copies (empty = 2 x the 高风险 originals)
AUGMENT_HAZARD_HUES=${AUGMENT_HAZARD_HUES:-}  # hues (degrees) the colour jitter keeps (empty = 0,27.3,50.2,223.3)
CUTOUTS_DIR=${CUTOUTS_DIR:-auto}              # RGBA hazard cut-outs; auto = demo's / $DATA_DIR/cutouts; none = off
[[ -n "$DATA_DIR" ]] && DATA_DIR=$(realpath -m "$DATA_DIR")
[[ -n "$MODEL_STAGE1" && -e "$MODEL_STAGE1" ]] && MODEL_STAGE1=$(realpath "$MODEL_STAGE1")  # a folder, from here
[[ -n "$MODEL_STAGE2" && -e "$MODEL_STAGE2" ]] && MODEL_STAGE2=$(realpath "$MODEL_STAGE2")
[[ "$CUTOUTS_DIR" != auto && "$CUTOUTS_DIR" != none ]] && CUTOUTS_DIR=$(realpath -m "$CUTOUTS_DIR")

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
start=$SECONDS
if [[ -z "$DATA_DIR" ]]; then RECIPE=demo; else RECIPE=${RECIPE:-real}; fi
# shellcheck disable=SC1090
source "recipes/$RECIPE.env"                  # MAX_PIXELS (augment at the model's size), TORCH_DTYPE
export MAX_PIXELS                             # the consistency filter scores at the size training sees
# Every knob is checked here, before the demo build and the image checks (a range is checked against the
# data by tools.data.prepare, still before anything is written).
python -m tools.knobs OUTPUT_DIR="$OUTPUT_DIR" DATA_DIR="$DATA_DIR" VAL_RATIO="$VAL_RATIO" SEED="$SEED" \
  FOLDS="$FOLDS" SKIP_BAD_IMAGES="$SKIP_BAD_IMAGES" STAGE1_MIN_SHARE="$STAGE1_MIN_SHARE" STAGE2_HIGH_REPEAT="$STAGE2_HIGH_REPEAT" \
  STAGE2_OTHER_RATIO="$STAGE2_OTHER_RATIO" STAGE2_TARGET="$STAGE2_TARGET" DEMO_SEED="$DEMO_SEED" DEMO_TRAIN="$DEMO_TRAIN" DEMO_TEST="$DEMO_TEST" \
  DEMO_QUICK="$DEMO_QUICK" AUGMENT="$AUGMENT" AUGMENT_FILTER="$AUGMENT_FILTER" \
  AUGMENT_FILTER_RATIO="$AUGMENT_FILTER_RATIO" MAX_PIXELS="$MAX_PIXELS" TORCH_DTYPE="$TORCH_DTYPE" \
  SCORE_BATCH_SIZE="$SCORE_BATCH_SIZE" ${MODEL_STAGE1:+MODEL_STAGE1="$MODEL_STAGE1"} \
  ${MODEL_STAGE2:+MODEL_STAGE2="$MODEL_STAGE2"}
lock_outputs                                  # one script per output folder

if [[ "$RECIPE" == demo ]]; then
  DATA_DIR=$DEMO_DATA_DIR
  demo=(python -m tools.demo.make --models-dir "$DEMO_MODELS_DIR" --seed "$DEMO_SEED")
  [[ "$DEMO_QUICK" == 1 ]] && demo+=(--quick)
  step "demo data and models (models cached in $DEMO_MODELS_DIR)" \
    "${demo[@]}" --data-dir "$DATA_DIR" --train "$DEMO_TRAIN" --test "$DEMO_TEST"
  MODEL_STAGE1=${MODEL_STAGE1:-$("${demo[@]}" --print-model stage1)}
  MODEL_STAGE2=${MODEL_STAGE2:-$("${demo[@]}" --print-model stage2)}
  [[ "$CUTOUTS_DIR" == auto ]] && CUTOUTS_DIR=$DATA_DIR/cutouts
else
  MODEL_STAGE1=${MODEL_STAGE1:-Qwen/Qwen2.5-VL-7B-Instruct}
  MODEL_STAGE2=${MODEL_STAGE2:-Qwen/Qwen2.5-VL-3B-Instruct}
  if [[ "$CUTOUTS_DIR" == auto ]]; then
    if [[ -d "$DATA_DIR/cutouts" ]]; then CUTOUTS_DIR=$DATA_DIR/cutouts; else CUTOUTS_DIR=none; fi
  fi
fi

log "data: $DATA_DIR   recipe: $RECIPE   output: $OUTPUT_DIR"
log "stage 1 model: $MODEL_STAGE1"
log "stage 2 model: $MODEL_STAGE2"
step "validate, prepare the images, split" \
  python -m tools.data.prepare \
    --data-dir "$DATA_DIR" \
    --output-dir "$OUTPUT_DIR" \
    --max-pixels "$MAX_PIXELS" \
    --val-ratio "$VAL_RATIO" \
    --seed "$SEED" \
    --folds "$FOLDS" \
    --skip-bad-images "$SKIP_BAD_IMAGES" \
    "$@"
if [[ "$AUGMENT" == 1 ]]; then
  augment_args=()
  [[ "$CUTOUTS_DIR" != none ]] && augment_args+=(--cutouts "$CUTOUTS_DIR")
  [[ -n "$AUGMENT_MULTIPLIERS" ]] && augment_args+=(--multipliers "$AUGMENT_MULTIPLIERS")
  [[ -n "$AUGMENT_INSERT" ]] && augment_args+=(--insert "$AUGMENT_INSERT")
  [[ -n "$AUGMENT_HAZARD_HUES" ]] && augment_args+=(--hazard-hues "$AUGMENT_HAZARD_HUES")
  step "augment the training split" \
    python -m tools.augment.run \
      --output-dir "$OUTPUT_DIR" \
      --seed "$SEED" \
      --max-pixels "$MAX_PIXELS" \
      --filter "$AUGMENT_FILTER" \
      --filter-ratio "$AUGMENT_FILTER_RATIO" \
      --model-stage1 "$MODEL_STAGE1" \
      --recipe "$RECIPE" \
      --torch-dtype "$TORCH_DTYPE" \
      --score-batch-size "$SCORE_BATCH_SIZE" \
      "${augment_args[@]}"
fi
step "compose the stage sets" \
  python -m tools.compose.stage_sets \
    --output-dir "$OUTPUT_DIR" \
    --augment "$AUGMENT" \
    ${STAGE1_MIN_SHARE:+--stage1-min-share "$STAGE1_MIN_SHARE"} \
    ${STAGE2_HIGH_REPEAT:+--stage2-high-repeat "$STAGE2_HIGH_REPEAT"} \
    ${STAGE2_OTHER_RATIO:+--stage2-other-ratio "$STAGE2_OTHER_RATIO"} \
    --stage2-target "$STAGE2_TARGET" \
    --recipe "$RECIPE" \
    --model-stage1 "$MODEL_STAGE1" \
    --model-stage2 "$MODEL_STAGE2"
log "total $((SECONDS - start)) s; next: bash train.sh"
