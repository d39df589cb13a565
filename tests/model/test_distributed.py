"""tools.model.distributed: the arithmetic that keeps the recipe's training with several processes (accumulation
divided by the world size, with a message when it does not divide; evaluation and saving every EVAL_EVERY epochs,
counted as swift and HF count steps; the demo's single process unchanged), and what train.sh's preflight refuses
(processes, DeepSpeed, liger under ZeRO-3, resuming another layout). Issue 16."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import ROOT
from tests.model.support import OK_ENV
from tools.fileio import DataError
from tools.model import distributed as D
from tools.task import Layout


# --------------------------------------------------------------------------- world size and accumulation
@pytest.mark.parametrize("env, world", [
    ({}, 1), ({"NPROC_PER_NODE": "2"}, 2), ({"NNODES": "2"}, 2), ({"NPROC_PER_NODE": "4", "NNODES": "2"}, 8),
    ({"NPROC_PER_NODE": "", "NNODES": ""}, 1), ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "1"}, 4),
])
def test_world_size(env, world):
    assert D.world_size(env) == world


@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0': expected a whole number >= 1"),
    ({"NPROC_PER_NODE": "gpu"}, "NPROC_PER_NODE='gpu'"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 but NNODES=2"),
])
def test_world_size_refusals(env, message):
    with pytest.raises(DataError, match=message):
        D.world_size(env)


def test_accumulation_is_divided_by_the_world_size():
    assert D.split_accumulation(4, 1, 4) == (4, None)
    assert D.split_accumulation(4, 2, 4) == (2, None)
    assert D.split_accumulation(4, 4, 4) == (1, None)
    assert D.split_accumulation(16, 8, 1) == (2, None)


@pytest.mark.parametrize("accum, world, batch, per_process, global_batch", [
    (4, 3, 4, 1, 12),   # 12 is nearer 16 than 24
    (3, 2, 4, 2, 16),   # 8 and 16 are as near to 12: the larger
    (1, 2, 16, 1, 32),  # the demo's GRAD_ACCUM=1 on two processes: the batch doubles
    (4, 8, 4, 1, 32),
    (5, 2, 1, 3, 6),    # 4 and 6 are as near to 5: the larger
])
def test_an_accumulation_that_does_not_divide_says_which_global_batch_results(accum, world, batch, per_process,
                                                                                global_batch):
    got, message = D.split_accumulation(accum, world, batch)
    assert got == per_process
    assert message.startswith(f"GRAD_ACCUM={accum} does not divide by {world} processes: {per_process} per process")
    assert (f"global batch {batch} x {per_process} x {world} = {global_batch} instead of the recipe's "
            f"{batch} x {accum} = {batch * accum}") in message


@pytest.mark.parametrize("batch, accum, micro, world, per_process, global_batch", [
    (4, 4, 8, 1, 2, 16),    # the real recipe's stage 2: 8 x 2
    (4, 4, 8, 2, 1, 16),
    (4, 4, 16, 1, 1, 16),
    (16, 1, 8, 1, 2, 16),   # the demo's 16 x 1 in passes of 8
    (4, 4, 2, 3, 3, 18),    # 16 / 6: 2.67 -> 3 (18 is nearer than 12)
    (4, 4, 3, 1, 5, 15),    # 16 / 3: 5.33 -> 5
])
def test_a_stage_batch_keeps_the_global_batch(batch, accum, micro, world, per_process, global_batch):
    got, message = D.split_accumulation(accum, world, batch, micro)
    assert got == per_process and micro * got * world == global_batch
    assert (message is None) == (global_batch == batch * accum)
    if message:
        assert message.startswith(f"the recipe's {batch * accum} rows a step (BATCH_SIZE x GRAD_ACCUM) do not divide "
                                  f"into batches of {micro}")
        assert f"global batch {micro} x {got} x {world} = {global_batch} instead of the recipe's" in message
    same = D.plan(4000, batch, accum, 2, world, 0.5, "auto", micro_batch=micro)
    assert (same.batch_size, same.accum, same.global_batch, same.recipe_batch) == (micro, got, global_batch, batch)
    if message is None and accum % world == 0:  # the same global batch: the same steps as the recipe's own batch
        mine = D.plan(4000, batch, accum, 2, world, 0.5, "auto")
        assert (same.per_epoch, same.max_steps, same.eval_steps) == (mine.per_epoch, mine.max_steps, mine.eval_steps)


@pytest.mark.parametrize("batch, accum, micro, world, accum_then", [
    (4, 4, 8, 4, 1),    # the real recipe's stage 2 on four GPUs: 8 x 1 x 4 would be 32 rows: 4 x 1 x 4
    (4, 4, 8, 3, 1),    # 24 > 16: 4 x 1 x 3, as stage 1 (its own line says 12)
    (4, 1, 8, 1, 1),    # a batch of 8 in a recipe of 4 rows a step
])
def test_a_stage_batch_never_grows_the_global_batch(batch, accum, micro, world, accum_then):
    plan = D.plan(4000, batch, accum, 2, world, 0.5, "auto", micro_batch=micro)
    assert (plan.batch_size, plan.accum) == (batch, accum_then)
    assert plan.notes[0] == (f"batches of {micro} on {world} process{'es' if world > 1 else ''} would make more than "
                             f"the recipe's {batch * accum} rows a step: batches of {batch} (BATCH_SIZE)")


def test_describe_says_a_stage_batch():
    assert D.describe(D.plan(1050, 4, 4, 2, 1, 0.5, "auto", micro_batch=8), "stage2")[0] == (
        "stage2: batches of 8 (not 4), gradient accumulation 4 -> 2 per process, global batch 8 x 2 x 1 = 16 "
        "(the recipe's)")
    assert len(D.describe(D.plan(1050, 4, 4, 2, 1, 0.5, "auto", micro_batch=4), "stage2")) == 1
    lines = D.describe(D.plan(1050, 4, 4, 2, 4, 0.5, "auto", micro_batch=8), "stage2")
    assert lines[0] == "stage2: 4 processes: gradient accumulation 4 -> 1 per process, global batch 4 x 1 x 4 = 16 " \
                       "(the recipe's)"
    assert lines[1].startswith("stage2: batches of 8 on 4 processes would make more than the recipe's 16 rows")


# --------------------------------------------------------------------------- steps as swift and HF count them
def swift_steps_per_epoch(rows: int, batch: int, accum: int, world: int) -> int:
    """swift's own BatchSamplerShard (the length of each process's dataloader), then HF's optimizer steps."""
    from swift.dataloader.shard import BatchSamplerShard

    class Sharded(BatchSamplerShard):
        world_size = world  # what dist.get_world_size() would say under torchrun
        rank = 0

    batches = len(Sharded(rows, batch_size=batch, shuffle=True, drop_last=False, data_seed=42))
    return max(batches // accum + int(batches % accum > 0), 1)  # transformers' Trainer.set_initial_training_values


@pytest.mark.parametrize("rows", [1, 7, 16, 59, 967, 1001, 4000])
@pytest.mark.parametrize("batch, accum, world", [(16, 1, 1), (4, 4, 1), (4, 2, 2), (4, 1, 4), (2, 3, 3), (16, 1, 2)])
def test_steps_per_epoch_match_swift_and_hf(rows, batch, accum, world):
    if rows < world:
        with pytest.raises(DataError, match=f"{rows} training rows for {world} processes"):
            D.steps_per_epoch(rows, batch, accum, world)
        return
    assert D.steps_per_epoch(rows, batch, accum, world) == swift_steps_per_epoch(rows, batch, accum, world)


def test_the_demo_recipe_single_process_is_unchanged():
    """recipes/demo.env as train.sh sources it, one process: the flags the demo trained with before (accumulation
    1, eval and save steps 1000: one evaluation, at the end), the demo's 967 stage-1 rows giving its 244 steps."""
    values = subprocess.run(["bash", "-c", "source recipes/demo.env; echo $BATCH_SIZE $GRAD_ACCUM $EVAL_STEPS "
                             "$EPOCHS_STAGE1 $EVAL_EVERY"], cwd=ROOT, capture_output=True, text=True,
                            check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    batch, accum, eval_steps, epochs, every = values
    assert (batch, accum, eval_steps) == ("16", "1", "1000")
    plan = D.plan(967, int(batch), int(accum), float(epochs), 1, float(every), eval_steps)
    assert (plan.accum, plan.eval_steps, plan.per_epoch, plan.max_steps, plan.evaluations) == (1, 1000, 61, 244, 1)
    assert D.describe(plan, "stage1") == ["stage1: 967 rows, 61 steps an epoch, 244 in all; evaluates and saves every "
                                          "1000 steps (EVAL_STEPS=1000): once, at the end"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_eval_every_keeps_the_schedule_in_epochs_whatever_the_world_size(world):
    """The real recipe (batch 4 x 4, 2 epochs, EVAL_EVERY 0.5): the same global batch, the same optimizer steps and
    the same evaluation steps with 1, 2 or 4 processes."""
    plan = D.plan(4000, 4, 4, 2, world, 0.5, "auto")
    assert plan.global_batch == 16 and plan.accum == 4 // world
    assert (plan.per_epoch, plan.max_steps, plan.eval_steps, plan.evaluations) == (250, 500, 125, 4)
    assert plan.notes == []


def test_eval_steps_from_rows_batch_and_fraction():
    assert D.eval_steps_for(0.5, 250) == 125
    assert D.eval_steps_for(0.25, 66) == 16  # round(16.5) = 16 (banker's), at least 1
    assert D.eval_steps_for(0.01, 10) == 1
    assert D.eval_steps_for(2, 10) == 20  # every second epoch
    plan = D.plan(1050, 4, 4, 2, 2, 0.25, "auto")  # ~stage 2 of the real data on 2 GPUs
    assert (plan.per_epoch, plan.max_steps, plan.eval_steps, plan.evaluations) == (66, 132, 16, 9)
    with pytest.raises(ValueError):
        D.eval_steps_for(0, 10)


def test_an_explicit_eval_steps_wins():
    for world in (1, 2):
        plan = D.plan(4000, 4, 4, 2, world, 0.5, "100")
        assert plan.eval_steps == 100 and plan.eval_source == "EVAL_STEPS=100" and plan.evaluations == 5
    with pytest.raises(DataError, match="EVAL_STEPS='0'"):
        D.plan(4000, 4, 4, 2, 1, 0.5, "0")


def test_describe_says_what_changed():
    lines = D.describe(D.plan(4000, 4, 4, 2, 2, 0.5, "auto"), "stage1")
    assert lines[0] == "stage1: 2 processes: gradient accumulation 4 -> 2 per process, global batch 4 x 2 x 2 = 16 " \
                       "(the recipe's)"
    assert lines[-1] == ("stage1: 4000 rows, 250 steps an epoch, 500 in all; evaluates and saves every 125 steps "
                         "(EVAL_EVERY=0.5 epoch): 4 times")
    lines = D.describe(D.plan(4000, 4, 4, 2, 3, 0.5, "auto"), "stage2")
    assert any("GRAD_ACCUM=4 does not divide by 3 processes" in line for line in lines)


def test_cli(tmp_path, capsys, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n" * 4000 + "\n", encoding="utf-8")  # a blank line does not count
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.delenv("NNODES", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    args = ["plan", "--dataset", str(rows), "--batch-size", "4", "--grad-accum", "4", "--epochs", "2"]
    assert D.main([*args, "--eval-every", "0.5", "--eval-steps", "auto", "--what", "stage1"]) == 0
    out, err = capsys.readouterr()
    assert out == "2 125 4\n" and "stage1: 2 processes" in err
    assert D.main([*args, "--eval-steps", "30", "--world", "1"]) == 0
    assert capsys.readouterr().out == "4 30 4\n"
    assert D.main([*args, "--eval-steps", "30", "--world", "1", "--micro-batch", "8"]) == 0
    assert capsys.readouterr().out == "2 30 8\n"
    assert D.main(["world"]) == 0 and capsys.readouterr().out == "2\n"
    monkeypatch.setenv("DEEPSPEED", "zero2")
    assert D.main(["swift-flags"]) == 0
    out = capsys.readouterr().out.split()
    assert out[:2] == ["--deepspeed", "zero2"]
    assert D.main(["plan", "--dataset", str(tmp_path / "missing.jsonl"), "--batch-size", "4", "--grad-accum", "4",
                   "--epochs", "2"]) == 1
    assert "missing.jsonl: not found" in capsys.readouterr().err


def test_swift_flags():
    assert D.swift_flags({}, cuda=False) == [] == D.swift_flags({}, cuda=True)
    assert D.swift_flags({"NPROC_PER_NODE": "2"}, cuda=True) == []
    # on CPUs accelerate wraps the model in DDP only with use_cpu (MULTI_CPU, gloo): tests/model/test_ddp.py
    assert D.swift_flags({"NPROC_PER_NODE": "2"}, cuda=False) == ["--use_cpu", "true"]
    assert D.swift_flags({"NPROC_PER_NODE": "1"}, cuda=False) == []
    assert D.swift_flags({"DEEPSPEED": "zero3", "NPROC_PER_NODE": "2"}, cuda=True) == ["--deepspeed", "zero3"]


# --------------------------------------------------------------------------- what the preflight refuses
def test_setup_problems():
    assert D.setup_problems({}, ["stage1", "stage2"], cuda_devices=0) == []
    assert D.setup_problems({"NPROC_PER_NODE": "2"}, ["stage1"], cuda_devices=0) == []  # DDP on CPUs (gloo)
    assert D.setup_problems({"NPROC_PER_NODE": "2", "DEEPSPEED": "zero2"}, ["stage1"], cuda_devices=2) == []
    (found,) = D.setup_problems({"NPROC_PER_NODE": "4"}, ["stage1"], cuda_devices=2)
    assert found.startswith("NPROC_PER_NODE=4 but 2 GPU(s) visible here")
    (found,) = D.setup_problems({"DEEPSPEED": "zero2"}, ["stage1"], cuda_devices=0)
    assert found.startswith("DEEPSPEED=zero2 needs CUDA GPUs")
    (found,) = D.setup_problems({"NNODES": "2", "NODE_RANK": "5"}, ["stage1"], cuda_devices=2)
    assert "NODE_RANK=5 but NNODES=2" in found


def test_liger_fused_loss_is_refused_under_zero3_only():
    env = {"DEEPSPEED": "zero3", "NPROC_PER_NODE": "2", "USE_LIGER_KERNEL_STAGE1": "true",
           "USE_LIGER_KERNEL_STAGE2": "true"}
    found = D.setup_problems(env, ["stage1", "stage2"], cuda_devices=2)
    # stage 1 with swift's loss: liger's fused cross-entropy reads lm_head.weight outside lm_head's forward;
    # stage 2's weighted_ce takes the logits (lm_head is called as a module), so liger's loss is not used
    assert len(found) == 1 and found[0].startswith("USE_LIGER_KERNEL_STAGE1=true with DEEPSPEED=zero3")
    assert "empty partition" in found[0]
    assert len(D.setup_problems({**env, "STAGE2_LOSS": ""}, ["stage1", "stage2"], cuda_devices=2)) == 2
    assert D.setup_problems({**env, "STAGE1_LOSS": "weighted_ce"}, ["stage1", "stage2"], cuda_devices=2) == []
    assert D.setup_problems({**env, "DEEPSPEED": "zero2"}, ["stage1", "stage2"], cuda_devices=2) == []
    assert D.setup_problems(env, ["stage2"], cuda_devices=2) == []


def fake_checkpoint(folder, *, deepspeed: bool, ranks: int = 2, stage: int = 2):
    """A checkpoint folder with the files HF (optimizer.pt) or DeepSpeed (global_stepN/ per-rank shards) write."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    if not deepspeed:
        (folder / "optimizer.pt").write_bytes(b"o")
        return folder
    step = folder / "global_step10"
    step.mkdir()
    for r in range(ranks):
        (step / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"o")
        if stage == 3:
            (step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"m")
    if stage != 3:
        (step / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (folder / "latest").write_text("global_step10")
    return folder


def test_checkpoint_layout_and_resume_problems(tmp_path):
    plain = fake_checkpoint(tmp_path / "plain", deepspeed=False)
    zero2 = fake_checkpoint(tmp_path / "zero2", deepspeed=True, ranks=2)
    zero3 = fake_checkpoint(tmp_path / "zero3", deepspeed=True, ranks=2, stage=3)
    assert D.checkpoint_layout(plain) == {"deepspeed": False, "zero_stage": None, "processes": None}
    assert D.checkpoint_layout(zero2) == {"deepspeed": True, "zero_stage": None, "processes": 2}
    assert D.checkpoint_layout(zero3) == {"deepspeed": True, "zero_stage": 3, "processes": 2}
    two = {"NPROC_PER_NODE": "2"}
    assert D.resume_problems(plain, {}) == [] == D.resume_problems(plain, two)  # DDP: optimizer.pt is whole
    assert D.resume_problems(zero2, {**two, "DEEPSPEED": "zero2"}) == []
    assert D.resume_problems(zero3, {**two, "DEEPSPEED": "zero3"}) == []
    (found,) = D.resume_problems(zero2, two)
    assert "was saved by DeepSpeed" in found and "RESUME=0" in found
    (found,) = D.resume_problems(plain, {**two, "DEEPSPEED": "zero2"})
    assert "was saved without DeepSpeed" in found
    (found,) = D.resume_problems(zero2, {"NPROC_PER_NODE": "4", "DEEPSPEED": "zero2"})
    assert "saved by 2 DeepSpeed processes, this run has 4" in found
    (found,) = D.resume_problems(zero3, {**two, "DEEPSPEED": "zero2"})
    assert "saved with ZeRO-3, this run has DEEPSPEED=zero2" in found


def test_the_preflight_refuses_resuming_another_layout(out, tmp_path):
    """RESUME=1 with an unfinished run whose newest checkpoint DeepSpeed saved: refused without DEEPSPEED, before
    any training; a run that would start afresh (begun on other data) is not looked at."""
    from tools.model.checkpoint import start
    from tools.model.preflight import problems

    layout = Layout(out)
    env = {**OK_ENV, "RESUME": "1", "NPROC_PER_NODE": "2"}
    work = start(layout, "stage1", "final", model=env["MODEL_STAGE1"])  # as train.sh starts it
    fake_checkpoint(work / "checkpoint-4", deepspeed=True, ranks=2)
    found = problems(layout, ["stage1", "stage2"], ["final"], env)
    assert len(found) == 1 and "was saved by DeepSpeed" in found[0] and "checkpoint-4" in found[0]
    assert problems(layout, ["stage1", "stage2"], ["final"], {**env, "RESUME": "0"}) == []
    assert problems(layout, ["stage1", "stage2"], ["final"], {**env, "MODEL_STAGE1": "/models/other"}) == []  # afresh
    record = json.loads((work / "trained_on.json").read_text(encoding="utf-8"))
    record["fingerprint"]["digest"] = record["fingerprint"]["parts"]["train_rows"] = "other data"
    (work / "trained_on.json").write_text(json.dumps(record), encoding="utf-8")
    assert problems(layout, ["stage1", "stage2"], ["final"], env) == []  # train.sh starts it afresh
    (work / "trained_on.json").write_text('{"fingerprint": "a record of another shape"}', encoding="utf-8")
    assert problems(layout, ["stage1", "stage2"], ["final"], env) == []


def test_the_preflight_wants_a_row_for_every_process(out):
    from tools.model.preflight import problems

    layout = Layout(out)
    rows = D.count_rows(layout.train_jsonl("stage2"))
    env = {"TORCH_DTYPE": "float32", "MODEL_STAGE1": "a/b", "MODEL_STAGE2": "a/b", "NPROC_PER_NODE": str(rows + 1)}
    found = [p for p in problems(layout, ["stage2"], ["final"], env) if "training processes" in p]
    assert found == [f"{layout.train_jsonl('stage2')}: {rows} rows for {rows + 1} training processes: every process "
                     f"needs one"]


def test_deepspeed_0_19_is_refused_with_the_amplifier_under_zero2(monkeypatch):
    """deepspeed 0.19 broadcasts each parameter as torch.uint8 views at start-up (ZeRO-1/2): the amplifier's 0-dim
    parameters cannot be viewed so (tests/model/test_deepspeed.py runs ZeRO-2 with 0.18)."""
    import torch

    with pytest.raises(RuntimeError, match="cannot be 0"):
        torch.zeros(()).view(torch.uint8)  # what deepspeed 0.19's _broadcast_model does with gate.token_scale
    env = {"DEEPSPEED": "zero2", "NPROC_PER_NODE": "2"}
    monkeypatch.setattr(D, "_deepspeed_version", lambda: "0.19.8")
    (found,) = D.setup_problems(env, ["stage1", "stage2"], cuda_devices=2)
    assert "deepspeed 0.19.8 and the hr_amplifier tuner (stage2)" in found and "deepspeed<0.19" in found
    assert D.setup_problems(env, ["stage1"], cuda_devices=2) == []  # stage 1 is plain LoRA by default
    assert D.setup_problems({**env, "STAGE2_TUNER": "lora"}, ["stage2"], cuda_devices=2) == []
    assert D.setup_problems({**env, "DEEPSPEED": "zero3"}, ["stage2"], cuda_devices=2) == []  # zero.Init: no broadcast
    for version in ("0.18.9", "0.18.0+cu12", None):
        monkeypatch.setattr(D, "_deepspeed_version", lambda v=version: v)
        assert D.setup_problems(env, ["stage1", "stage2"], cuda_devices=2) == []
