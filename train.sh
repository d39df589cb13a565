#!/usr/bin/env bash
# Stage 1: LoRA on MODEL_STAGE1 for all five labels. Stage 2: the high-risk specialist on MODEL_STAGE2, by
# default with the class-weighted loss and the High-Risk Feature Amplifier (swift_plugins/, docs/plugins.md).
# Knobs come from what data-pre.sh recorded ($OUTPUT_DIR/data/manifest.json) and recipes/$RECIPE.env; any variable
# set in the environment wins. Each run trains into <run>.training and replaces the previous model only once swift
# saved a checkpoint; a stage not retrained now must have trained on the current data (ALLOW_STALE=1 to override). Extra arguments go straight to `swift sft` for both stages and override ours:
#   bash train.sh --lora_rank 16 --num_train_epochs 3
#   STAGES=stage2 bash train.sh          # retrain the specialist only
#   STAGE1_LOSS=weighted_ce STAGE1_TUNER=hr_amplifier bash train.sh    # plugins for stage 1 too
#   RUNS=final bash train.sh             # with FOLDS > 1: skip the fold runs
#   RESUME=1 bash train.sh               # after an interruption: continue where each run stopped
# With FOLDS > 1 (set in data-pre.sh), each fold i first gets its own stage runs on the other folds (test.sh pools
# their predictions of fold i to tune fusion), then the final models train as with FOLDS=1. Every run picks its
# checkpoint on the validation split, never on its held-out fold.
set -euo pipefail

OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-$(dirname "${BASH_SOURCE[0]}")/outputs}")  # default: outputs/ beside the scripts
STAGES=${STAGES:-stage1 stage2}
RUNS=${RUNS:-folds final}                     # folds: the k fold runs (FOLDS > 1 only); final: the models test.sh submits
SEED=${SEED:-42}
RESUME=${RESUME:-0}                           # 1: continue each unfinished run from its last checkpoint, keep finished ones
ALLOW_STALE=${ALLOW_STALE:-0}                 # 1: keep a stage not retrained now even if it trained on other data
# Plugins: every file `python -m swift_plugins --list` names is loaded (--external_plugins); these pick what is used.
STAGE1_TUNER=${STAGE1_TUNER:-lora}            # lora | hr_amplifier (LoRA + High-Risk Feature Amplifier)
STAGE2_TUNER=${STAGE2_TUNER:-hr_amplifier}
STAGE1_LOSS=${STAGE1_LOSS-}                   # empty = swift's cross-entropy | weighted_ce (class-weighted, focal)
STAGE2_LOSS=${STAGE2_LOSS-weighted_ce}
STAGE1_TASK=${STAGE1_TASK:-causal_lm}         # causal_lm: the answer's first token | seq_cls: a classification head
STAGE2_TASK=${STAGE2_TASK:-causal_lm}
HARD_NEGATIVES=${HARD_NEGATIVES:-0}           # > 0: stage 2 gets one more row for this many x #高风险 of the non-高风险
                                              # training images stage 1 rates most 高风险 (its confusions); 0 = off
EVAL_METRIC=${EVAL_METRIC-weighted_f1}        # the validation metric plugin; empty = eval loss picks the checkpoint
STAGE1_BEST_METRIC=${STAGE1_BEST_METRIC:-weighted_f1}     # what picks stage 1's checkpoint: the competition score
STAGE2_BEST_METRIC=${STAGE2_BEST_METRIC:-high_risk_auc}   # stage 2's: what fusion uses, its 高风险-vs-rest ranking
export FIRESAFE_CLASS_WEIGHTS=${FIRESAFE_CLASS_WEIGHTS:-}  # weighted_ce: "3,1.5,1,1,1" or "高风险=3"; empty = task's
export FIRESAFE_FOCAL_GAMMA=${FIRESAFE_FOCAL_GAMMA:-0}     # weighted_ce: focal term γ (0 = plain weighted CE)
export FIRESAFE_AMP_LAYERS=${FIRESAFE_AMP_LAYERS:-auto}   # hr_amplifier: LLM layers with the attention bias
export FIRESAFE_AMP_LR=${FIRESAFE_AMP_LR:-}               # hr_amplifier: its own learning rate (empty = 1e-2)
export FIRESAFE_AMP_ATTN=${FIRESAFE_AMP_ATTN:-fused}      # hr_amplifier: β as one more head dim (fused SDPA) | mask

[[ -n "${MODEL_STAGE1:-}" && -e "$MODEL_STAGE1" ]] && MODEL_STAGE1=$(realpath "$MODEL_STAGE1")  # a folder, from here
[[ -n "${MODEL_STAGE2:-}" && -e "$MODEL_STAGE2" ]] && MODEL_STAGE2=$(realpath "$MODEL_STAGE2")

cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/common.sh
# What data-pre.sh recorded (the environment wins), read as plain values: nothing in it runs as shell code.
{ IFS= read -r -d '' recorded_recipe && IFS= read -r -d '' recorded_model1 && IFS= read -r -d '' recorded_model2 \
    && IFS= read -r -d '' recorded_test_list && IFS= read -r -d '' recorded_labelled && IFS= read -r -d '' recorded_folds \
    && IFS= read -r -d '' recorded_stage2_target
} < <(python -m tools.state --output-dir "$OUTPUT_DIR" settings)
RECIPE=${RECIPE:-$recorded_recipe}
MODEL_STAGE1=${MODEL_STAGE1:-$recorded_model1}
MODEL_STAGE2=${MODEL_STAGE2:-$recorded_model2}
FOLDS=${FOLDS:-$recorded_folds}               # 1 = no fold runs
# shellcheck disable=SC1090
source "recipes/$RECIPE.env"                  # the recipe's knobs below (MAX_PIXELS, LORA_RANK, ...)
export MAX_PIXELS                             # swift caps qwen_vl_utils' resize by it (tools/data/images.py)
BATCH_SIZE_STAGE1=${BATCH_SIZE_STAGE1:-$BATCH_SIZE}  # rows a forward pass; the accumulation keeps BATCH_SIZE x GRAD_ACCUM
BATCH_SIZE_STAGE2=${BATCH_SIZE_STAGE2:-$BATCH_SIZE}
python -m tools.knobs STAGES="$STAGES" RUNS="$RUNS" SEED="$SEED" RESUME="$RESUME" ALLOW_STALE="$ALLOW_STALE" \
  FIRESAFE_AMP_LR="$FIRESAFE_AMP_LR" FIRESAFE_AMP_ATTN="$FIRESAFE_AMP_ATTN" STAGE1_TASK="$STAGE1_TASK" STAGE2_TASK="$STAGE2_TASK" HARD_NEGATIVES="$HARD_NEGATIVES" \
  MODEL_STAGE1="$MODEL_STAGE1" MODEL_STAGE2="$MODEL_STAGE2" FOLDS="$FOLDS" MAX_PIXELS="$MAX_PIXELS" \
  TORCH_DTYPE="$TORCH_DTYPE" LORA_RANK="$LORA_RANK" LORA_ALPHA="$LORA_ALPHA" LORA_DROPOUT="$LORA_DROPOUT" \
  LEARNING_RATE="$LEARNING_RATE" EPOCHS_STAGE1="$EPOCHS_STAGE1" EPOCHS_STAGE2="$EPOCHS_STAGE2" \
  BATCH_SIZE="$BATCH_SIZE" GRAD_ACCUM="$GRAD_ACCUM" BATCH_SIZE_STAGE1="$BATCH_SIZE_STAGE1" \
  BATCH_SIZE_STAGE2="$BATCH_SIZE_STAGE2" WARMUP_RATIO="$WARMUP_RATIO" EVAL_STEPS="$EVAL_STEPS" \
  DATALOADER_WORKERS="$DATALOADER_WORKERS" GRADIENT_CHECKPOINTING="$GRADIENT_CHECKPOINTING" \
  VIT_GRADIENT_CHECKPOINTING="$VIT_GRADIENT_CHECKPOINTING" USE_LIGER_KERNEL_STAGE1="$USE_LIGER_KERNEL_STAGE1" \
  USE_LIGER_KERNEL_STAGE2="$USE_LIGER_KERNEL_STAGE2" CKPT_SKIP_LAYERS_STAGE1="$CKPT_SKIP_LAYERS_STAGE1" \
  CKPT_SKIP_LAYERS_STAGE2="$CKPT_SKIP_LAYERS_STAGE2" FP8_BASE_STAGE1="$FP8_BASE_STAGE1" FP8_BASE_STAGE2="$FP8_BASE_STAGE2"
# --- several GPUs (issue 16): torchrun through swift's CLI (NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT), DeepSpeed (DEEPSPEED=zero2|zero3), evaluation every EVAL_EVERY epochs (EVAL_STEPS=auto). Node 0 keeps
# the output folder (lock, checkpoints); the other nodes of a multi-node run only train (README "Several GPUs").
DEEPSPEED=${DEEPSPEED:-}                      # empty | zero2 | zero3 (pip install -e '.[deepspeed]')
NODE_RANK=${NODE_RANK:-0}
EVAL_EVERY=${EVAL_EVERY:-0.5}                 # epochs between evaluations (and saves) with EVAL_STEPS=auto
python -m tools.knobs NPROC_PER_NODE="${NPROC_PER_NODE:-}" NNODES="${NNODES:-}" NODE_RANK="$NODE_RANK" \
  MASTER_ADDR="${MASTER_ADDR:-}" MASTER_PORT="${MASTER_PORT:-}" DEEPSPEED="$DEEPSPEED" EVAL_EVERY="$EVAL_EVERY"
python -m tools.model.distributed world >/dev/null   # NODE_RANK below NNODES
[[ -n "${NPROC_PER_NODE:-}" ]] || unset NPROC_PER_NODE   # empty = unset, as swift's torchrun launcher reads them
[[ -n "${NNODES:-}" ]] || unset NNODES
[[ -n "${MASTER_ADDR:-}" ]] || unset MASTER_ADDR
[[ -n "${MASTER_PORT:-}" ]] || unset MASTER_PORT
# DeepSpeed needs torchrun's distributed environment, one process too (HF sets it up only under a launcher)
if [[ -n "$DEEPSPEED" && -z "${NPROC_PER_NODE:-}" && -z "${NNODES:-}" ]]; then export NPROC_PER_NODE=1; fi
export DEEPSPEED RESUME STAGE1_LOSS STAGE2_LOSS HARD_NEGATIVES   # for the preflight's checks
# --- end several GPUs
(( NODE_RANK > 0 )) || lock_outputs           # one script per output folder
if (( FOLDS > 1 )); then python -m tools.decide.oof --output-dir "$OUTPUT_DIR" --folds "$FOLDS" --check; fi
# Without torchrun swift would spread each model over every visible GPU (device_map auto): a slow pipeline.
if [[ -z "${NPROC_PER_NODE:-}" && -z "${CUDA_VISIBLE_DEVICES:-}" ]] && (( $(gpu_count) > 1 )); then
  export CUDA_VISIBLE_DEVICES=0
  log "$(gpu_count) GPUs and no NPROC_PER_NODE: training on GPU 0 (CUDA_VISIBLE_DEVICES=0)"
fi
# --- several GPUs (issue 16): NPROC_PER_NODE=N with more GPUs visible takes the first N (swift would otherwise
# spread each process's model over the rest with device_map, which DeepSpeed refuses)
if [[ -n "${NPROC_PER_NODE:-}" && -z "${CUDA_VISIBLE_DEVICES:-}" ]] && (( $(gpu_count) > NPROC_PER_NODE )); then
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((NPROC_PER_NODE - 1)))
  log "$(gpu_count) GPUs and NPROC_PER_NODE=$NPROC_PER_NODE: training on GPUs $CUDA_VISIBLE_DEVICES"
fi
dist_text=$(python -m tools.model.distributed swift-flags)   # --deepspeed; --use_cpu true for DDP on CPUs
dist_flags=()
[[ -z "$dist_text" ]] || mapfile -t dist_flags <<< "$dist_text"
# --- end several GPUs
# Both stages' settings must be able to run here (packages, dtype, attention, models, training sets): checked now,
# not at stage 2's first step.
TORCH_DTYPE=$TORCH_DTYPE ATTN_IMPL=$ATTN_IMPL USE_LIGER_KERNEL_STAGE1=$USE_LIGER_KERNEL_STAGE1 \
  USE_LIGER_KERNEL_STAGE2=$USE_LIGER_KERNEL_STAGE2 STAGE1_TUNER=$STAGE1_TUNER STAGE2_TUNER=$STAGE2_TUNER \
  MODEL_STAGE1=$MODEL_STAGE1 MODEL_STAGE2=$MODEL_STAGE2 FP8_BASE_STAGE1=$FP8_BASE_STAGE1 FP8_BASE_STAGE2=$FP8_BASE_STAGE2 \
  python -m tools.model.preflight --output-dir "$OUTPUT_DIR" --stages "$STAGES" --runs "$RUNS"
# A stage kept as it is must have trained on the current data (else test.sh would pair it with a new model).
python -m tools.state --output-dir "$OUTPUT_DIR" models --except-stages "$STAGES" --runs "$RUNS" \
  --allow-stale "$ALLOW_STALE"
runs=()
for run in $RUNS; do
  if [[ "$run" == folds ]]; then
    for ((fold = 0; FOLDS > 1 && fold < FOLDS; fold++)); do runs+=("$fold"); done
  else
    runs+=(final)
  fi
done
mapfile -t PLUGINS < <(python -m swift_plugins --list)
[[ ${#PLUGINS[@]} -gt 0 ]] || { log "no plugin files in swift_plugins/"; exit 1; }

start=$SECONDS
log "recipe: $RECIPE   output: $OUTPUT_DIR   stages: $STAGES   runs: ${runs[*]}"
for run in "${runs[@]}"; do
  for stage in $STAGES; do
    case $stage in
      stage1) model=$MODEL_STAGE1 epochs=$EPOCHS_STAGE1 tuner=$STAGE1_TUNER loss=$STAGE1_LOSS liger=$USE_LIGER_KERNEL_STAGE1
              best=$STAGE1_BEST_METRIC task=$STAGE1_TASK num_labels=5 skip=$CKPT_SKIP_LAYERS_STAGE1 batch=$BATCH_SIZE_STAGE1
              fp8=$FP8_BASE_STAGE1 ;;
      stage2) model=$MODEL_STAGE2 epochs=$EPOCHS_STAGE2 tuner=$STAGE2_TUNER loss=$STAGE2_LOSS liger=$USE_LIGER_KERNEL_STAGE2
              best=$STAGE2_BEST_METRIC task=$STAGE2_TASK num_labels=5 skip=$CKPT_SKIP_LAYERS_STAGE2 batch=$BATCH_SIZE_STAGE2
              fp8=$FP8_BASE_STAGE2
              [[ "$recorded_stage2_target" == binary ]] && num_labels=2 ;;   # 高风险 or 非高风险 (STAGE2_TARGET)
    esac
    of=""; [[ "$run" == final ]] || of=", fold $run of $FOLDS"
    train_set=$(path train_jsonl "$stage" "$run" "$task")
    val_set=$(path val_jsonl "$stage" "$task")
    work_dir=$(path run_work_dir "$stage" "$run")   # replaces the run folder only once it holds a checkpoint
    if [[ "$stage" == stage2 && "$HARD_NEGATIVES" != 0 ]]; then   # scored with this run's stage 1; same model = same rows
      python -m tools.model.hard_negatives --output-dir "$OUTPUT_DIR" --run "$run" --task "$task" \
        --ratio "$HARD_NEGATIVES" --batch-size "$SCORE_BATCH_SIZE" -- --max_pixels "$MAX_PIXELS"
      train_set=$(path hard_negative_train_jsonl "$run" "$task")
    fi
    resume_from=""
    if [[ "$RESUME" == 1 ]]; then
      if [[ ! -d "$work_dir" ]] && python -m tools.state --output-dir "$OUTPUT_DIR" models --stages "$stage" \
           --runs "$run" 2>/dev/null; then
        log "$stage$of: trained on the current data, kept (RESUME=1)"
        continue
      fi
      resume_from=$(python -m tools.model.checkpoint latest --output-dir "$OUTPUT_DIR" --stage "$stage" --run "$run" \
        --model "$model")
      if [[ -n "$resume_from" ]]; then log "$stage$of: continuing from $resume_from (RESUME=1)"; fi
    fi
    if (( NODE_RANK == 0 )); then                 # several nodes: node 0 writes the output folder (issue 16)
      [[ -n "$resume_from" ]] || rm -rf "$work_dir"  # an unfinished run is continued, or started afresh
      python -m tools.model.checkpoint start --output-dir "$OUTPUT_DIR" --stage "$stage" --run "$run" \
        --task "$task" --model "$model" --train-set "$train_set" >/dev/null
    fi
    plugin_flags=(--external_plugins "${PLUGINS[@]}" --tuner_type "$tuner")
    [[ "$task" == seq_cls ]] && plugin_flags+=(--num_labels "$num_labels")
    [[ -n "$loss" ]] && plugin_flags+=(--loss_type "$loss")
    [[ "$tuner" == hr_amplifier ]] && plugin_flags+=(--optimizer hr_amplifier --callbacks amplifier_stats)
    [[ -n "$EVAL_METRIC" ]] && plugin_flags+=(--eval_metric "$EVAL_METRIC" --metric_for_best_model "$best" --greater_is_better true)
    stage_start=$SECONDS
    [[ -n "$EVAL_METRIC" ]] || best="eval loss"
    log "$stage ($model$of): tuner $tuner, loss ${loss:-cross_entropy}, best checkpoint by $best"
    # --- several GPUs (issue 16): accumulation per process (the recipe's global batch) and evaluation steps
    plan=$(python -m tools.model.distributed plan --dataset "$train_set" --batch-size "$BATCH_SIZE" \
      --grad-accum "$GRAD_ACCUM" --micro-batch "$batch" --epochs "$epochs" --eval-every "$EVAL_EVERY" \
      --eval-steps "$EVAL_STEPS" --what "$stage")
    read -r grad_accum eval_steps batch <<< "$plan"
    # --- end several GPUs
    export FIRESAFE_CKPT_SKIP_LAYERS=$skip        # swift_plugins/patches/checkpoint_layers.py
    export FIRESAFE_FP8_BASE=$fp8                 # swift_plugins/patches/fp8_base.py
    # --logging_nan_inf_filter false: a NaN loss shows in the log instead of being averaged away, and the GPU is not
    # waited for after every micro-step to check (bench/README.md, "Stage 2: where the GPU waits")
    swift sft \
      --model "$model" \
      --template qwen2_5_vl \
      --task_type "$task" \
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
      --per_device_train_batch_size "$batch" \
      --per_device_eval_batch_size "$batch" \
      --gradient_accumulation_steps "$grad_accum" \
      --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
      --vit_gradient_checkpointing "$VIT_GRADIENT_CHECKPOINTING" \
      --use_liger_kernel "$liger" \
      --eval_strategy steps \
      --eval_steps "$eval_steps" \
      --save_strategy steps \
      --save_steps "$eval_steps" \
      --save_total_limit 1 \
      --save_only_model false \
      --logging_steps 10 \
      --logging_nan_inf_filter false \
      --dataloader_num_workers "$DATALOADER_WORKERS" \
      --dataset_num_proc 1 \
      --report_to tensorboard \
      --seed "$SEED" \
      --data_seed "$SEED" \
      --output_dir "$work_dir" \
      --add_version false \
      ${resume_from:+--resume_from_checkpoint "$resume_from"} \
      "${dist_flags[@]}" \
      "$@"
    if (( NODE_RANK > 0 )); then log "$stage: trained on node $NODE_RANK; node 0 keeps the checkpoint"; continue; fi
    checkpoint=$(python -m tools.model.checkpoint finish --output-dir "$OUTPUT_DIR" --stage "$stage" --run "$run")
    log "$stage checkpoint: $checkpoint ($((SECONDS - stage_start)) s)"
  done
done
log "total $((SECONDS - start)) s; next: bash test.sh"
