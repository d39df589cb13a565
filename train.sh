#!/usr/bin/env bash
# Stage 1: LoRA on MODEL_STAGE1 for all five labels. Stage 2: the high-risk specialist on MODEL_STAGE2, by
# default with the class-weighted loss and the High-Risk Feature Amplifier (swift_plugins/, docs/plugins.md).
# Knobs come from $OUTPUT_DIR/pipeline.env (written by data-pre.sh) and recipes/$RECIPE.env; any variable set
# in the environment wins. Extra arguments go straight to `swift sft` for both stages and override ours:
#   bash train.sh --lora_rank 16 --num_train_epochs 3
#   STAGES=stage2 bash train.sh          # retrain the specialist only
#   STAGE1_LOSS=weighted_ce STAGE1_TUNER=hr_amplifier bash train.sh    # plugins for stage 1 too
#   RUNS=final bash train.sh             # with FOLDS > 1: skip the fold runs
# With FOLDS > 1 (set in data-pre.sh), each fold i first gets its own stage runs on the other folds (test.sh pools
# their predictions of fold i to tune fusion), then the final models train as with FOLDS=1. Every run picks its
# checkpoint on the validation split, never on its held-out fold.
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-outputs}")
STAGES=${STAGES:-stage1 stage2}
RUNS=${RUNS:-folds final}                     # folds: the k fold runs (FOLDS > 1 only); final: the models test.sh submits
SEED=${SEED:-42}
# Plugins: every file `python -m swift_plugins --list` names is loaded (--external_plugins); these pick what is used.
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
load_pipeline                                 # pipeline.env, then recipes/$RECIPE.env: the recipe's knobs below
FOLDS=${FOLDS:-1}                             # from pipeline.env (data-pre.sh); 1 = no fold runs
if (( FOLDS > 1 )); then python -m tools.decide.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS" --check; fi
for stage in $STAGES; do
  [[ "$stage" == stage1 || "$stage" == stage2 ]] || { log "unknown stage '$stage' in STAGES (expected stage1, stage2)"; exit 1; }
done
runs=()
for run in $RUNS; do
  case $run in
    folds) for ((fold = 0; FOLDS > 1 && fold < FOLDS; fold++)); do runs+=("$fold"); done ;;
    final) runs+=(final) ;;
    *) log "unknown run '$run' in RUNS (expected folds, final)"; exit 1 ;;
  esac
done
mapfile -t PLUGINS < <(python -m swift_plugins --list)
[[ ${#PLUGINS[@]} -gt 0 ]] || { log "no plugin files in swift_plugins/"; exit 1; }

start=$SECONDS
log "recipe: ${RECIPE:-real}   output: $OUTPUT_DIR   stages: $STAGES   runs: ${runs[*]}"
for run in "${runs[@]}"; do
  for stage in $STAGES; do
    case $stage in
      stage1) model=$MODEL_STAGE1 epochs=$EPOCHS_STAGE1 tuner=$STAGE1_TUNER loss=$STAGE1_LOSS liger=$USE_LIGER_KERNEL_STAGE1 ;;
      stage2) model=$MODEL_STAGE2 epochs=$EPOCHS_STAGE2 tuner=$STAGE2_TUNER loss=$STAGE2_LOSS liger=$USE_LIGER_KERNEL_STAGE2 ;;
    esac
    train_set=$(path train_jsonl "$stage" "$run")
    val_set=$(path val_jsonl "$stage")
    run_dir=$(path run_dir "$stage" "$run")
    plugin_flags=(--external_plugins "${PLUGINS[@]}" --tuner_type "$tuner")
    [[ -n "$loss" ]] && plugin_flags+=(--loss_type "$loss")
    [[ "$tuner" == hr_amplifier ]] && plugin_flags+=(--callbacks amplifier_stats)
    [[ -n "$EVAL_METRIC" ]] && plugin_flags+=(--eval_metric "$EVAL_METRIC" --metric_for_best_model "$EVAL_METRIC" --greater_is_better true)
    of=""; [[ "$run" == final ]] || of=", fold $run of $FOLDS"
    stage_start=$SECONDS
    log "$stage ($model$of): tuner $tuner, loss ${loss:-cross_entropy}, best checkpoint by ${EVAL_METRIC:-eval loss}"
    rm -rf "${run_dir:?}"
    swift sft \
      --model "$model" \
      --template qwen2_5_vl \
      --check_model false \
      --dataset "$train_set" \
      --val_dataset "$val_set" \
      "${plugin_flags[@]}" \
      --lora_rank "$LORA_RANK" \
      --lora_alpha "$LORA_ALPHA" \
      --lora_dropout "$LORA_DROPOUT" \
      --target_modules $TARGET_MODULES \
      --torch_dtype "$TORCH_DTYPE" \
      --attn_impl "$ATTN_IMPL" \
      --max_pixels "$MAX_PIXELS" \
      --learning_rate "$LEARNING_RATE" \
      --warmup_ratio "$WARMUP_RATIO" \
      --num_train_epochs "$epochs" \
      --per_device_train_batch_size "$BATCH_SIZE" \
      --per_device_eval_batch_size "$BATCH_SIZE" \
      --gradient_accumulation_steps "$GRAD_ACCUM" \
      --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
      --vit_gradient_checkpointing "$VIT_GRADIENT_CHECKPOINTING" \
      --use_liger_kernel "$liger" \
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
      --seed "$SEED" \
      --data_seed "$SEED" \
      --output_dir "$run_dir" \
      --add_version false \
      "$@"
    checkpoint=$(python -m tools.model.checkpoint --run-dir "$run_dir")
    log "$stage checkpoint: $checkpoint ($((SECONDS - stage_start)) s)"
  done
done
log "total $((SECONDS - start)) s; next: bash test.sh"
