#!/usr/bin/env bash
# Stage 1: LoRA on MODEL_STAGE1 for all five labels. Stage 2: LoRA on MODEL_STAGE2, the high-risk specialist.
# Knobs come from $OUTPUT_DIR/pipeline.env (written by data-pre.sh) and recipes/$RECIPE.env; any variable set
# in the environment wins. Extra arguments go straight to `swift sft` for both stages and override ours:
#   bash train.sh --lora_rank 16 --num_train_epochs 3
#   STAGES=stage2 bash train.sh          # retrain the specialist only
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-outputs}")
STAGES=${STAGES:-stage1 stage2}
SEED=${SEED:-42}

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
load_pipeline

train_stage() {
  local stage=$1 model=$2 epochs=$3
  shift 3
  rm -rf "${OUTPUT_DIR:?}/$stage"
  swift sft \
    --model "$model" \
    --template qwen2_5_vl \
    --check_model false \
    --dataset "$OUTPUT_DIR/data/${stage}_train.jsonl" \
    --val_dataset "$OUTPUT_DIR/data/${stage}_val.jsonl" \
    --tuner_type lora \
    --lora_rank "$LORA_RANK" \
    --lora_alpha "$LORA_ALPHA" \
    --target_modules $TARGET_MODULES \
    --torch_dtype "$TORCH_DTYPE" \
    --max_pixels "$MAX_PIXELS" \
    --learning_rate "$LEARNING_RATE" \
    --warmup_ratio "$WARMUP_RATIO" \
    --num_train_epochs "$epochs" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --per_device_eval_batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy steps \
    --eval_steps "$EVAL_STEPS" \
    --save_strategy epoch \
    --save_total_limit 1 \
    --save_only_model true \
    --logging_steps 10 \
    --dataloader_num_workers "$DATALOADER_WORKERS" \
    --dataset_num_proc 1 \
    --report_to tensorboard \
    --seed "$SEED" \
    --data_seed "$SEED" \
    --output_dir "$OUTPUT_DIR/$stage" \
    --add_version false \
    "$@"
  log "$stage checkpoint: $(python -m tools.checkpoint --run-dir "$OUTPUT_DIR/$stage")"
}

start=$SECONDS
log "recipe: ${RECIPE:-real}   output: $OUTPUT_DIR   stages: $STAGES"
for stage in $STAGES; do
  case $stage in
    stage1) step "stage 1 ($MODEL_STAGE1)" train_stage stage1 "$MODEL_STAGE1" "$EPOCHS_STAGE1" "$@" ;;
    stage2) step "stage 2 ($MODEL_STAGE2)" train_stage stage2 "$MODEL_STAGE2" "$EPOCHS_STAGE2" "$@" ;;
    *) log "unknown stage '$stage' (expected stage1, stage2)"; exit 1 ;;
  esac
done
log "total $((SECONDS - start)) s; next: bash test.sh"
