"""train.sh against a fake `swift` (tests/helpers.py): the flags each stage gets (plugins, recipe knobs, the user's
own), and the runs it trains with and without folds (FOLDS, RUNS, STAGES). No model is trained."""
from __future__ import annotations

from pathlib import Path


from tests.helpers import fake_model, flag, prepared, run_script, swift_calls, swift_env, tree_state, value
from tools.fileio import read_json
from tools.task import HIGH_RISK, STAGES, Layout


def run_train_sh(tmp_path: Path, *args: str, recipe: str = "demo", **env: str) -> list[list[str]]:
    """(stage-1 argv, stage-2 argv) of one train.sh run with the final run only, on tiny prepared data (the fake
    swift reads none of it) with the models tmp_path/m1 and tmp_path/m2."""
    out, _ = prepared(tmp_path, recipe=recipe)
    run_script("train.sh", tmp_path, out, *args, **env)
    return swift_calls(tmp_path)


# --------------------------------------------------------------------------- the flags
def test_train_sh_uses_plugins_for_stage2_by_default(tmp_path):
    from swift_plugins import plugin_files

    stage1, stage2 = run_train_sh(tmp_path, "--lora_rank", "4")
    for argv in (stage1, stage2):
        assert argv[:2] == ["sft", "--model"]
        assert flag(argv, "--external_plugins") == [str(p) for p in plugin_files()]
        assert flag(argv, "--external_plugins")[-1].endswith("swift_plugins/patches/vision_attention.py")
        assert flag(argv, "--eval_metric") == ["weighted_f1"] and flag(argv, "--greater_is_better") == ["true"]
        assert flag(argv, "--save_steps") == flag(argv, "--eval_steps")  # every evaluated step can become the best
        assert argv[-2:] == ["--lora_rank", "4"]  # the user's flags come last and win
        # the recipe's knobs, always passed (recipes/demo.env sets swift's defaults)
        assert flag(argv, "--attn_impl") == ["sdpa"] and flag(argv, "--lora_dropout") == ["0.05"]
        assert flag(argv, "--gradient_checkpointing") == flag(argv, "--vit_gradient_checkpointing") == ["true"]
        assert flag(argv, "--use_liger_kernel") == ["false"]
        assert flag(argv, "--logging_nan_inf_filter") == ["false"]  # a NaN loss is logged, not averaged away
        assert flag(argv, "--max_pixels") == ["28224"] and flag(argv, "--torch_dtype") == ["float32"]
    assert value(stage1, "--model") == str(tmp_path / "m1") and value(stage2, "--model") == str(tmp_path / "m2")
    assert flag(stage1, "--save_only_model") == ["false"]  # optimizer state kept: RESUME=1 can continue a run
    assert flag(stage1, "--resume_from_checkpoint") == []
    assert flag(stage1, "--tuner_type") == ["lora"] and flag(stage1, "--loss_type") == []
    assert flag(stage1, "--callbacks") == []
    assert flag(stage2, "--tuner_type") == ["hr_amplifier"] and flag(stage2, "--loss_type") == ["weighted_ce"]
    assert flag(stage2, "--callbacks") == ["amplifier_stats"]
    # the amplifier trains at its own learning rate (swift_plugins/optimizer.py): with its tuner only
    assert flag(stage1, "--optimizer") == [] and flag(stage2, "--optimizer") == ["hr_amplifier"]
    # stage 1's checkpoint by the competition score, stage 2's by what fusion uses: its 高风险-vs-rest ranking
    assert flag(stage1, "--metric_for_best_model") == ["weighted_f1"]
    assert flag(stage2, "--metric_for_best_model") == ["high_risk_auc"]
    assert flag(stage1, "--num_train_epochs") == ["4"] and flag(stage2, "--num_train_epochs") == ["3"]
    assert "MAX_PIXELS=28224" in swift_env(tmp_path)  # swift caps qwen_vl_utils' resize by it


def test_train_sh_turns_plugins_on_for_stage1_and_passes_knobs(tmp_path):
    stage1, stage2 = run_train_sh(tmp_path, STAGE1_LOSS="weighted_ce", FIRESAFE_CLASS_WEIGHTS=f"{HIGH_RISK}=3",
                                  ATTN_IMPL="eager", GRADIENT_CHECKPOINTING="false")
    assert flag(stage1, "--loss_type") == ["weighted_ce"] and flag(stage1, "--tuner_type") == ["lora"]
    assert flag(stage2, "--attn_impl") == ["eager"] and flag(stage2, "--gradient_checkpointing") == ["false"]
    env = swift_env(tmp_path)
    assert f"FIRESAFE_CLASS_WEIGHTS={HIGH_RISK}=3" in env and "FIRESAFE_AMP_LAYERS=auto" in env
    assert "FIRESAFE_AMP_ATTN=fused" in env  # the amplifier's β through SDPA's fused kernels
    assert [line for line in env.splitlines() if "CKPT_SKIP" in line] == ["FIRESAFE_CKPT_SKIP_LAYERS=0"] * 2


def test_train_sh_keeps_some_layers_without_recompute_per_stage(tmp_path):
    run_train_sh(tmp_path, CKPT_SKIP_LAYERS_STAGE1="4", CKPT_SKIP_LAYERS_STAGE2="6", FP8_BASE_STAGE1="1")
    env = swift_env(tmp_path)  # each call's FIRESAFE_* variables, in call order
    assert [line for line in env.splitlines() if "CKPT_SKIP" in line] == ["FIRESAFE_CKPT_SKIP_LAYERS=4",
                                                                          "FIRESAFE_CKPT_SKIP_LAYERS=6"]
    # float8 base weights for stage 1 only (swift_plugins/patches/fp8_base.py)
    assert [line for line in env.splitlines() if "FP8_BASE" in line] == ["FIRESAFE_FP8_BASE=1", "FIRESAFE_FP8_BASE=0"]
    stage1, stage2 = run_train_sh(tmp_path, STAGE1_TUNER="hr_amplifier", STAGE2_LOSS="", EVAL_METRIC="")
    assert flag(stage1, "--tuner_type") == ["hr_amplifier"] and flag(stage1, "--callbacks") == ["amplifier_stats"]
    assert flag(stage1, "--optimizer") == ["hr_amplifier"]
    assert flag(stage2, "--loss_type") == [] and flag(stage2, "--tuner_type") == ["hr_amplifier"]
    for argv in (stage1, stage2):  # empty = off
        assert flag(argv, "--eval_metric") == [] and flag(argv, "--metric_for_best_model") == []
        assert flag(argv, "--greater_is_better") == []


def test_train_sh_picks_each_stage_checkpoint_by_its_metric_and_the_optimizer_by_the_tuner(tmp_path):
    out, _ = prepared(tmp_path)
    log = run_script("train.sh", tmp_path, out, STAGE2_BEST_METRIC="high_risk_f1", STAGE1_BEST_METRIC="accuracy",
                     STAGE2_TUNER="lora", FIRESAFE_AMP_LR="5e-3")
    stage1, stage2 = swift_calls(tmp_path)
    assert flag(stage1, "--metric_for_best_model") == ["accuracy"]
    assert flag(stage2, "--metric_for_best_model") == ["high_risk_f1"]
    assert flag(stage2, "--eval_metric") == ["weighted_f1"]  # one metric plugin computes them all
    assert "stage2 (" in log and "tuner lora, loss weighted_ce, best checkpoint by high_risk_f1" in log
    for argv in (stage1, stage2):  # no amplifier, no optimizer plugin nor its callback
        assert flag(argv, "--tuner_type") == ["lora"]
        assert flag(argv, "--optimizer") == [] and flag(argv, "--callbacks") == []
    assert "FIRESAFE_AMP_LR=5e-3" in swift_env(tmp_path)  # exported for the optimizer plugin
    run_script("train.sh", tmp_path, out, STAGES="stage2")
    (stage2,) = swift_calls(tmp_path)
    assert flag(stage2, "--metric_for_best_model") == ["high_risk_auc"]  # the defaults again
    assert flag(stage2, "--optimizer") == ["hr_amplifier"]
    assert "FIRESAFE_AMP_LR=\n" in swift_env(tmp_path)  # empty: the plugin's own default (1e-2)


def test_train_sh_checks_the_machine_before_training(tmp_path):
    """train.sh's preflight (tools.model.preflight): the real recipe's bfloat16 and liger on a machine without a GPU
    fail before stage 1, naming both."""
    out, layout = prepared(tmp_path, recipe="real")
    log = run_script("train.sh", tmp_path, out, rc=1, FAKE_GPU="0")
    assert "this machine cannot train with these settings" in log
    assert "TORCH_DTYPE=bfloat16 on a machine without a CUDA GPU" in log
    assert "USE_LIGER_KERNEL_STAGE1=true needs a CUDA GPU" in log
    assert swift_calls(tmp_path) == [] and not layout.run_work_dir("stage1").exists()
    log = run_script("train.sh", tmp_path, out, FAKE_GPU="0", TORCH_DTYPE="float32", USE_LIGER_KERNEL_STAGE1="false")
    assert "preflight: stage1 stage2 can train here" in log and len(swift_calls(tmp_path)) == 2


def test_train_sh_sets_liger_per_stage(tmp_path):
    # recipes/real.env turns liger on for stage 1 only: with stage 2's custom loss it would keep full logits.
    stage1, stage2 = run_train_sh(tmp_path, USE_LIGER_KERNEL_STAGE1="true", USE_LIGER_KERNEL_STAGE2="false")
    assert flag(stage1, "--use_liger_kernel") == ["true"] and flag(stage2, "--use_liger_kernel") == ["false"]
    stage1, stage2 = run_train_sh(tmp_path)  # the demo recipe: swift's default, off, for both
    assert flag(stage1, "--use_liger_kernel") == ["false"] == flag(stage2, "--use_liger_kernel")
    stage1, stage2 = run_train_sh(tmp_path, USE_LIGER_KERNEL="true")  # the old single knob is gone
    assert flag(stage1, "--use_liger_kernel") == ["false"] == flag(stage2, "--use_liger_kernel")


def test_train_sh_takes_the_real_recipe(tmp_path):
    stage1, stage2 = run_train_sh(tmp_path, recipe="real")
    assert flag(stage1, "--use_liger_kernel") == ["true"] and flag(stage2, "--use_liger_kernel") == ["false"]
    for argv in (stage1, stage2):
        assert flag(argv, "--vit_gradient_checkpointing") == ["false"]
        assert flag(argv, "--gradient_checkpointing") == ["true"]
        assert flag(argv, "--torch_dtype") == ["bfloat16"] and flag(argv, "--max_pixels") == ["1003520"]
        assert flag(argv, "--attn_impl") == ["sdpa"]
    # 16 rows an optimizer step in both; the 3B in fewer, larger passes (BATCH_SIZE_STAGE2), all of its layers recomputed
    assert [flag(a, "--per_device_train_batch_size") + flag(a, "--gradient_accumulation_steps")
            for a in (stage1, stage2)] == [["4", "4"], ["8", "2"]]
    env = swift_env(tmp_path)
    assert "FIRESAFE_VISION_ATTN=auto" in env  # the recipe's exported patch knobs reach swift
    assert [line for line in env.splitlines() if "CKPT_SKIP" in line] == ["FIRESAFE_CKPT_SKIP_LAYERS=0"] * 2


def test_each_stage_takes_its_own_batch_and_keeps_the_global_one(tmp_path):
    # the demo recipe: 16 x 1; stage 1 in passes of 8 accumulates 2
    stage1, stage2 = run_train_sh(tmp_path, BATCH_SIZE_STAGE1="8")
    assert [flag(a, "--per_device_train_batch_size") + flag(a, "--per_device_eval_batch_size")
            + flag(a, "--gradient_accumulation_steps") for a in (stage1, stage2)] == [["8", "8", "2"], ["16", "16", "1"]]
    log = run_script("train.sh", tmp_path, prepared(tmp_path / "b", recipe="demo")[0], rc=1, BATCH_SIZE_STAGE2="0")
    assert "BATCH_SIZE_STAGE2='0': expected a whole number >= 1" in log and swift_calls(tmp_path) == []


def test_train_sh_refuses_unknown_stages_and_runs(tmp_path):
    out, _ = prepared(tmp_path)
    before = tree_state(out)
    log = run_script("train.sh", tmp_path, out, rc=1, STAGES="stage1 stage3")
    assert "STAGES='stage1 stage3': expected stage1, stage2 or both, separated by spaces" in log
    assert swift_calls(tmp_path) == []
    log = run_script("train.sh", tmp_path, out, rc=1, RUNS="all")
    assert "RUNS='all': expected folds, final or both, separated by spaces" in log and swift_calls(tmp_path) == []
    assert tree_state(out) == before  # refused before the lock: nothing written, not even the lock file
    Layout(out).manifest.unlink()
    log = run_script("train.sh", tmp_path, out, rc=1)
    assert "manifest.json: not found: run data-pre.sh first" in log and swift_calls(tmp_path) == []


# --------------------------------------------------------------------------- the runs, with FOLDS=2
def test_train_sh_with_two_folds(tmp_path):
    out, layout = prepared(tmp_path, None, "--folds", "2")

    log = run_script("train.sh", tmp_path, out, "--lora_rank", "4")
    calls = swift_calls(tmp_path)
    runs = [(0, "stage1"), (0, "stage2"), (1, "stage1"), (1, "stage2"), ("final", "stage1"), ("final", "stage2")]
    assert len(calls) == len(runs)
    for argv, (run, stage) in zip(calls, runs):
        assert argv[:2] == ["sft", "--model"]
        assert value(argv, "--model") == str(tmp_path / ("m1" if stage == "stage1" else "m2"))
        assert value(argv, "--dataset") == str(layout.train_jsonl(stage, run))
        assert value(argv, "--output_dir") == str(layout.run_work_dir(stage, run))  # swapped in when it holds one
        # checkpoints are chosen on the validation split, never on the held-out fold
        assert value(argv, "--val_dataset") == str(layout.val_jsonl(stage))
        assert value(argv, "--tuner_type") == ("lora" if stage == "stage1" else "hr_amplifier")
        assert argv[-2:] == ["--lora_rank", "4"]  # the user's flags reach every run
        run_dir = layout.run_dir(stage, run)
        assert (run_dir / "final_checkpoint.txt").read_text().strip() == "checkpoint-1"  # relative to run_dir
        assert (run_dir / "checkpoint-1").is_dir() and layout.trained_on(stage, run).exists()
        assert not layout.run_work_dir(stage, run).exists()
    assert layout.run_dir("stage1", 1) == out / "folds" / "1" / "stage1"
    assert f"stage1 ({tmp_path / 'm1'}, fold 1 of 2): tuner lora" in log
    assert f"stage2 ({tmp_path / 'm2'}): tuner hr_amplifier" in log

    # only some runs: RUNS and STAGES
    run_script("train.sh", tmp_path, out, RUNS="final")
    assert [value(a, "--output_dir") for a in swift_calls(tmp_path)] == [str(layout.run_work_dir(s)) for s in STAGES]
    run_script("train.sh", tmp_path, out, RUNS="folds", STAGES="stage2")
    assert [value(a, "--output_dir") for a in swift_calls(tmp_path)] == [str(layout.run_work_dir("stage2", i))
                                                                         for i in range(2)]
    # a FOLDS that is not the split's fails before any training
    log = run_script("train.sh", tmp_path, out, rc=1, FOLDS="3")
    assert "FOLDS=3, but data-pre.sh split the training data into 2 fold(s)" in log and swift_calls(tmp_path) == []
    # a fold's data missing (data-pre.sh interrupted): refused before any training
    layout.heldout_jsonl(1).unlink()
    log = run_script("train.sh", tmp_path, out, rc=1)
    assert f"{layout.heldout_jsonl(1)}: missing since data-pre.sh finished" in log and swift_calls(tmp_path) == []


def test_train_sh_without_folds(tmp_path):
    out, layout = prepared(tmp_path)
    run_script("train.sh", tmp_path, out)
    calls = swift_calls(tmp_path)
    assert [value(a, "--dataset") for a in calls] == [str(layout.train_jsonl(s)) for s in STAGES]
    assert [value(a, "--output_dir") for a in calls] == [str(out / f"{s}.training") for s in STAGES]
    assert [(out / s / "final_checkpoint.txt").read_text() for s in STAGES] == ["checkpoint-1\n"] * 2
    assert not layout.folds_dir.exists()
    run_script("train.sh", tmp_path, out, RUNS="folds")  # no folds to train: nothing to do
    assert swift_calls(tmp_path) == []


def test_the_run_records_the_base_model_it_trained_on(tmp_path):
    out, layout = prepared(tmp_path)
    other = fake_model(tmp_path / "m3")
    run_script("train.sh", tmp_path, out, MODEL_STAGE2=str(other))
    _, stage2 = swift_calls(tmp_path)
    assert value(stage2, "--model") == str(other)
    assert read_json(layout.trained_on("stage2"))["fingerprint"]["parts"]["model"] == str(other)


def test_train_sh_mines_hard_negatives_with_stage_1_before_stage_2(tmp_path):
    import json

    from tools.fileio import read_jsonl
    from tools.state import run_fingerprint

    out, layout = prepared(tmp_path)
    calls_file = tmp_path / "score_calls.jsonl.hard"
    run_script("train.sh", tmp_path, out, HARD_NEGATIVES="0.5")
    _, stage2 = swift_calls(tmp_path)
    mined = layout.hard_negative_train_jsonl()
    assert value(stage2, "--dataset") == str(mined)
    (call,) = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert call["checkpoint"] == str((out / "stage1" / "checkpoint-1").resolve())  # the stage 1 trained just now
    assert call["argv"][call["argv"].index("--ratio") + 1] == "0.5"
    assert call["argv"][-2:] == ["--max_pixels", "28224"]
    # prepared(): 4 高风险 training images -> 2 extra rows on top of the composed set
    assert len(read_jsonl(mined)) == len(read_jsonl(layout.train_jsonl("stage2"))) + 2
    record = read_json(layout.trained_on("stage2"))
    assert record["train_set"] == str(mined.relative_to(out))
    assert "train_set" in record["fingerprint"]["parts"]
    # the recorded fingerprint is the one the current files give: test.sh's check passes
    assert record["fingerprint"] == run_fingerprint(layout, read_json(layout.manifest), "stage2", "final",
                                                    train_set=record["train_set"])
    run_script("test.sh", tmp_path, out)

    # retraining stage 2 alone mines again with the kept stage 1: the same rows, the same fingerprint
    calls_file.unlink()
    before = mined.read_bytes()
    run_script("train.sh", tmp_path, out, STAGES="stage2", HARD_NEGATIVES="0.5")
    assert mined.read_bytes() == before and len(calls_file.read_text().splitlines()) == 1
    # another ratio: other rows; stage 2 trained on them, so the check still passes; HARD_NEGATIVES=0: the composed set
    run_script("train.sh", tmp_path, out, STAGES="stage2", HARD_NEGATIVES="1")
    assert len(read_jsonl(mined)) == len(read_jsonl(layout.train_jsonl("stage2"))) + 4
    swift_calls(tmp_path)
    run_script("train.sh", tmp_path, out, STAGES="stage2", HARD_NEGATIVES="0")
    (stage2,) = swift_calls(tmp_path)
    assert value(stage2, "--dataset") == str(layout.train_jsonl("stage2"))
    assert "train_set" not in read_json(layout.trained_on("stage2"))


def test_train_sh_refuses_hard_negatives_without_a_stage_1(tmp_path):
    out, layout = prepared(tmp_path)
    log = run_script("train.sh", tmp_path, out, rc=1, STAGES="stage2", HARD_NEGATIVES="1")
    assert "stage 2's hard negatives are mined with stage 1, which has no model" in log and swift_calls(tmp_path) == []
    log = run_script("train.sh", tmp_path, out, rc=1, HARD_NEGATIVES="0.0")
    assert "HARD_NEGATIVES" in log and swift_calls(tmp_path) == []
