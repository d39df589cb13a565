#!/usr/bin/env bash
# Stage 1: LoRA on MODEL_STAGE1 for all five labels. Stage 2: the high-risk specialist on MODEL_STAGE2, by
# default with the class-weighted loss and the High-Risk Feature Amplifier (swift_plugins/, docs/plugins.md).
# Knobs come from $OUTPUT_DIR/pipeline.env (written by data-pre.sh) and recipes/$RECIPE.env; any variable set
# in the environment wins. Extra arguments go straight to `swift sft` for both stages and override ours:
#   bash train.sh --lora_rank 16 --num_train_epochs 3
#   STAGES=stage2 bash train.sh          # retrain the specialist only
#   STAGE1_LOSS=weighted_ce STAGE1_TUNER=hr_amplifier bash train.sh    # plugins for stage 1 too
#   RUNS=final bash train.sh             # with FOLDS > 1: skip the fold runs
# With FOLDS > 1 (set in data-pre.sh), each fold i first gets its own stage runs on the other folds
# ($OUTPUT_DIR/folds/<i>/stageN; test.sh pools their predictions of fold i to tune fusion), then the final
# models train as with FOLDS=1. Every run picks its checkpoint on the validation split, never on its held-out fold.
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-outputs}")
STAGES=${STAGES:-stage1 stage2}
RUNS=${RUNS:-folds final}                     # folds: the k fold runs (FOLDS > 1 only); final: the models test.sh submits
SEED=${SEED:-42}
# Plugins: every swift_plugins/*.py not starting with _ is loaded (--external_plugins); these pick what is used.
STAGE1_TUNER=${STAGE1_TUNER:-lora}            # lora | hr_amplifier (LoRA + High-Risk Feature Amplifier)
STAGE2_TUNER=${STAGE2_TUNER:-hr_amplifier}
STAGE1_LOSS=${STAGE1_LOSS-}                   # empty = swift's cross-entropy | weighted_ce (class-weighted, focal)
STAGE2_LOSS=${STAGE2_LOSS-weighted_ce}
EVAL_METRIC=${EVAL_METRIC-weighted_f1}        # validation metric that picks the best checkpoint; empty = eval loss
export FIRESAFE_CLASS_WEIGHTS=${FIRESAFE_CLASS_WEIGHTS:-}  # weighted_ce: "3,1.5,1,1,1" or "高风险=3"; empty = task's
export FIRESAFE_FOCAL_GAMMA=${FIRESAFE_FOCAL_GAMMA:-0}     # weighted_ce: focal term γ (0 = plain weighted CE)
export FIRESAFE_AMP_LAYERS=${FIRESAFE_AMP_LAYERS:-auto}   # hr_amplifier: LLM layers with the attention bias

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
load_pipeline
FOLDS=${FOLDS:-1}                             # from pipeline.env (data-pre.sh); 1 = no fold runs
if (( FOLDS > 1 )); then python -m tools.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS" --check; fi

mapfile -t PLUGINS < <(python -m swift_plugins --list)
[[ ${#PLUGINS[@]} -gt 0 ]] || { log "no plugin files in swift_plugins/"; exit 1; }

# plugin_flags TUNER LOSS: the tuner, loss, metric and callback flags of one stage.
plugin_flags() {
  local tuner=$1 loss=$2
  flags=(--external_plugins "${PLUGINS[@]}" --tuner_type "$tuner")
  [[ -n "$loss" ]] && flags+=(--loss_type "$loss")
  [[ "$tuner" == hr_amplifier ]] && flags+=(--callbacks amplifier_stats)
  if [[ -n "$EVAL_METRIC" ]]; then
    flags+=(--eval_metric "$EVAL_METRIC" --metric_for_best_model "$EVAL_METRIC" --greater_is_better true)
  fi
  return 0
}

# Recipe speed knobs (recipes/real.env); unset = swift's default, so a recipe without them runs as before.
recipe_flags=()
for pair in LORA_DROPOUT:--lora_dropout GRADIENT_CHECKPOINTING:--gradient_checkpointing \
            VIT_GRADIENT_CHECKPOINTING:--vit_gradient_checkpointing USE_LIGER_KERNEL:--use_liger_kernel \
            ATTN_IMPL:--attn_impl; do
  var=${pair%%:*}
  [[ -n "${!var:-}" ]] && recipe_flags+=("${pair#*:}" "${!var}")
done

# train_stage RUN STAGE MODEL EPOCHS TUNER LOSS [swift args]: RUN is `final` or a fold number.
train_stage() {
  local run=$1 stage=$2 model=$3 epochs=$4 tuner=$5 loss=$6
  shift 6
  local train=$OUTPUT_DIR/data/${stage}_train.jsonl out=$OUTPUT_DIR/$stage
  if [[ "$run" != final ]]; then
    train=$OUTPUT_DIR/data/folds/$run/${stage}_train.jsonl out=$OUTPUT_DIR/folds/$run/$stage
  fi
  plugin_flags "$tuner" "$loss"
  # Liger per stage: with a custom loss (stage 2's weighted_ce) swift keeps full logits and liger costs memory.
  local liger_var="USE_LIGER_KERNEL_${stage^^}" stage_flags=("${recipe_flags[@]}")
  [[ -n "${!liger_var:-}" ]] && stage_flags+=(--use_liger_kernel "${!liger_var}")
  log "$stage: tuner $tuner, loss ${loss:-cross_entropy}, best checkpoint by ${EVAL_METRIC:-eval loss}"
  rm -rf "${out:?}"
  swift sft \
    --model "$model" \
    --template qwen2_5_vl \
    --check_model false \
    --dataset "$train" \
    --val_dataset "$OUTPUT_DIR/data/${stage}_val.jsonl" \
    "${flags[@]}" \
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
    --save_strategy steps \
    --save_steps "$EVAL_STEPS" \
    --save_total_limit 1 \
    --save_only_model true \
    --logging_steps 10 \
    --dataloader_num_workers "$DATALOADER_WORKERS" \
    --dataset_num_proc 1 \
    --report_to tensorboard \
    "${stage_flags[@]}" \
    --seed "$SEED" \
    --data_seed "$SEED" \
    --output_dir "$out" \
    --add_version false \
    "$@"
  log "$stage checkpoint: $(python -m tools.checkpoint --run-dir "$out")"
}

runs=()
for run in $RUNS; do
  case $run in
    folds) for ((fold = 0; FOLDS > 1 && fold < FOLDS; fold++)); do runs+=("$fold"); done ;;
    final) runs+=(final) ;;
    *) log "unknown run '$run' in RUNS (expected folds, final)"; exit 1 ;;
  esac
done

start=$SECONDS
log "recipe: ${RECIPE:-real}   output: $OUTPUT_DIR   stages: $STAGES   runs: ${runs[*]}"
for run in "${runs[@]}"; do
  of=""; [[ "$run" == final ]] || of=", fold $run of $FOLDS"
  for stage in $STAGES; do
    case $stage in
      stage1) step "stage 1 ($MODEL_STAGE1)$of" \
                train_stage "$run" stage1 "$MODEL_STAGE1" "$EPOCHS_STAGE1" "$STAGE1_TUNER" "$STAGE1_LOSS" "$@" ;;
      stage2) step "stage 2 ($MODEL_STAGE2)$of" \
                train_stage "$run" stage2 "$MODEL_STAGE2" "$EPOCHS_STAGE2" "$STAGE2_TUNER" "$STAGE2_LOSS" "$@" ;;
      *) log "unknown stage '$stage' (expected stage1, stage2)"; exit 1 ;;
    esac
  done
done
log "total $((SECONDS - start)) s; next: bash test.sh"
