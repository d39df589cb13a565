"""train.sh and test.sh with several processes, GPUs and DeepSpeed (issue 16), against the fake swift and scorer
(tests/helpers.py: gpu_env adds a fake nvidia-smi, records the torchrun variables swift sees and, with cuda=True,
lets the preflight see CUDA GPUs and an importable deepspeed). No model is trained."""
from __future__ import annotations

import pytest

from tests.helpers import dist_calls, flag, prepared, run_gpu_script, score_calls, swift_calls, tree_state
from tools.model import distributed as D
from tools.task import STAGES, Layout

# The real recipe as a CPU can run it (bf16 and liger need CUDA): what changes with several processes is the batch
# arithmetic, 4 x 4 here, stage 2 in batches of 8 (BATCH_SIZE_STAGE2).
CPU_REAL = {"TORCH_DTYPE": "float32", "USE_LIGER_KERNEL_STAGE1": "false"}
REAL_BATCHES = {"stage1": 4, "stage2": 8}


def expected(layout: Layout, world: int, eval_steps: str = "auto") -> list[tuple[str, str]]:
    """(accumulation, eval steps) of each stage for the real recipe (4 x 4, 2 epochs, EVAL_EVERY 0.5)."""
    out = []
    for stage in STAGES:
        plan = D.plan(D.count_rows(layout.train_jsonl(stage)), 4, 4, 2, world, 0.5, eval_steps,
                      micro_batch=REAL_BATCHES[stage])
        out.append((str(plan.accum), str(plan.eval_steps)))
    return out


def batch_flags(argv: list[str]) -> tuple[str, str]:
    assert flag(argv, "--save_steps") == flag(argv, "--eval_steps")
    return flag(argv, "--gradient_accumulation_steps")[0], flag(argv, "--eval_steps")[0]


def test_one_process_keeps_the_recipes_flags(tmp_path):
    out, layout = prepared(tmp_path)
    run_gpu_script("train.sh", tmp_path, out)  # the demo recipe: as before issue 16
    calls = swift_calls(tmp_path)
    assert [batch_flags(a) for a in calls] == [("1", "1000")] * 2
    assert all(flag(a, "--deepspeed") == flag(a, "--use_cpu") == [] for a in calls)
    assert dist_calls(tmp_path) == [{}, {}]  # no torchrun variable: swift starts no torchrun

    out, layout = prepared(tmp_path / "real", recipe="real")
    log = run_gpu_script("train.sh", tmp_path, out, **CPU_REAL)
    assert [batch_flags(a) for a in swift_calls(tmp_path)] == expected(layout, 1)
    assert "evaluates and saves every" in log and "EVAL_EVERY=0.5 epoch" in log
    run_gpu_script("train.sh", tmp_path, out, EVAL_STEPS="7", **CPU_REAL)
    calls = swift_calls(tmp_path)
    assert [batch_flags(a) for a in calls] == [("4", "7"), ("2", "7")]  # stage 2: 8 rows a pass, 8 x 2 = 16
    assert [flag(a, "--per_device_train_batch_size") for a in calls] == [["4"], ["8"]]
    assert [flag(a, "--per_device_eval_batch_size") for a in calls] == [["4"], ["8"]]


def test_nproc_per_node_divides_the_accumulation(tmp_path):
    out, layout = prepared(tmp_path, recipe="real")
    log = run_gpu_script("train.sh", tmp_path, out, "--lora_rank", "4",
                         NPROC_PER_NODE="2", MASTER_PORT="29555", **CPU_REAL)
    calls = swift_calls(tmp_path)
    assert [batch_flags(a) for a in calls] == expected(layout, 2)
    assert [batch_flags(a)[0] for a in calls] == ["2", "1"]  # 4 x 2 x 2 and 8 x 1 x 2: 16 both
    assert "stage1: 2 processes: gradient accumulation 4 -> 2 per process, global batch 4 x 2 x 2 = 16 " \
           "(the recipe's)" in log
    for argv in calls:  # on CPUs: DDP only with --use_cpu (tests/model/test_ddp.py); the user's flags still last
        assert flag(argv, "--use_cpu") == ["true"] and argv[-2:] == ["--lora_rank", "4"]
    assert dist_calls(tmp_path) == [{"NPROC_PER_NODE": "2", "MASTER_PORT": "29555"}] * 2  # swift hands them to torchrun
    assert [(layout.run_dir(s) / "final_checkpoint.txt").exists() for s in STAGES] == [True, True]

    log = run_gpu_script("train.sh", tmp_path, out, NPROC_PER_NODE="3", **CPU_REAL)
    calls = swift_calls(tmp_path)
    assert [batch_flags(a)[0] for a in calls] == ["1", "1"]
    assert [flag(a, "--per_device_train_batch_size") for a in calls] == [["4"], ["4"]]
    assert "GRAD_ACCUM=4 does not divide by 3 processes: 1 per process, global batch 4 x 1 x 3 = 12 instead of the " \
           "recipe's 4 x 4 = 16" in log
    # stage 2's batches of 8 would make 24 rows a step: it takes BATCH_SIZE, as stage 1
    assert "stage2: batches of 8 on 3 processes would make more than the recipe's 16 rows a step: batches of 4 " \
           "(BATCH_SIZE)" in log
    run_gpu_script("train.sh", tmp_path, out, NPROC_PER_NODE="2", EVAL_STEPS="9", **CPU_REAL)
    assert [batch_flags(a) for a in swift_calls(tmp_path)] == [("2", "9"), ("1", "9")]  # an explicit EVAL_STEPS wins


def test_gpus_and_deepspeed(tmp_path):
    out, layout = prepared(tmp_path)
    run_gpu_script("train.sh", tmp_path, out, "--lora_rank", "4",
                   gpus=4, cuda=True, NPROC_PER_NODE="2", DEEPSPEED="zero2")
    calls = swift_calls(tmp_path)
    for argv in calls:
        assert flag(argv, "--deepspeed") == ["zero2"] and flag(argv, "--use_cpu") == []
        assert argv[-4:] == ["--deepspeed", "zero2", "--lora_rank", "4"]  # the user's flags win
    # 4 GPUs, 2 processes: the first two (swift would spread each process's model over the rest)
    assert dist_calls(tmp_path) == [{"CUDA_VISIBLE_DEVICES": "0,1", "NPROC_PER_NODE": "2"}] * 2
    run_gpu_script("train.sh", tmp_path, out, gpus=4, cuda=True, NPROC_PER_NODE="2",
                   CUDA_VISIBLE_DEVICES="2,3")
    assert dist_calls(tmp_path) == [{"CUDA_VISIBLE_DEVICES": "2,3", "NPROC_PER_NODE": "2"}] * 2  # the user's choice
    assert all(flag(a, "--deepspeed") == [] for a in swift_calls(tmp_path))
    run_gpu_script("train.sh", tmp_path, out, gpus=4, cuda=True)  # no NPROC_PER_NODE: GPU 0 as before
    assert dist_calls(tmp_path) == [{"CUDA_VISIBLE_DEVICES": "0"}] * 2
    swift_calls(tmp_path)
    # DeepSpeed in one process still goes through torchrun (HF sets DeepSpeed's distributed environment up only there)
    run_gpu_script("train.sh", tmp_path, out, gpus=4, cuda=True, DEEPSPEED="zero2")
    assert dist_calls(tmp_path) == [{"CUDA_VISIBLE_DEVICES": "0", "NPROC_PER_NODE": "1"}] * 2
    assert [flag(a, "--deepspeed") for a in swift_calls(tmp_path)] == [["zero2"]] * 2


@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two': expected empty (one process), or a whole number >= 1"),
    ({"DEEPSPEED": "zero1"}, "DEEPSPEED='zero1': expected empty (no DeepSpeed), zero2 or zero3"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 but NNODES=2"),
    ({"EVAL_EVERY": "0"}, "EVAL_EVERY='0': expected a number of epochs > 0"),
    ({"MASTER_PORT": "0"}, "MASTER_PORT='0': expected empty, or a port number"),
])
def test_bad_knobs_are_refused_before_any_work(tmp_path, env, message):
    out, layout = prepared(tmp_path)
    before = tree_state(out)
    log = run_gpu_script("train.sh", tmp_path, out, rc=1, **env)
    assert message in log
    assert swift_calls(tmp_path) == [] and tree_state(out) == before


def test_combinations_that_cannot_work_are_refused_before_training(tmp_path):
    out, layout = prepared(tmp_path, recipe="real")
    log = run_gpu_script("train.sh", tmp_path, out, rc=1, DEEPSPEED="zero2", **CPU_REAL)
    assert "DEEPSPEED=zero2 needs CUDA GPUs" in log
    log = run_gpu_script("train.sh", tmp_path, out, rc=1, gpus=2, cuda=True, NPROC_PER_NODE="2",
                         DEEPSPEED="zero3")
    assert "USE_LIGER_KERNEL_STAGE1=true with DEEPSPEED=zero3" in log  # the real recipe's stage 1
    assert "USE_LIGER_KERNEL_STAGE2" not in log
    log = run_gpu_script("train.sh", tmp_path, out, rc=1, gpus=2, cuda=True, NPROC_PER_NODE="4")
    assert "NPROC_PER_NODE=4 but 2 GPU(s) visible here" in log
    assert swift_calls(tmp_path) == []
    run_gpu_script("train.sh", tmp_path, out, gpus=2, cuda=True, NPROC_PER_NODE="2", DEEPSPEED="zero3",
                   USE_LIGER_KERNEL_STAGE1="false")
    assert [flag(a, "--deepspeed") for a in swift_calls(tmp_path)] == [["zero3"]] * 2


def test_nodes_other_than_0_only_train(tmp_path):
    out, layout = prepared(tmp_path)
    log = run_gpu_script("train.sh", tmp_path, out, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1",
                         MASTER_PORT="29500", NPROC_PER_NODE="1")
    assert len(swift_calls(tmp_path)) == 2
    assert dist_calls(tmp_path) == [{"NPROC_PER_NODE": "1", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                                     "MASTER_PORT": "29500"}] * 2
    assert "stage1: trained on node 1; node 0 keeps the checkpoint" in log
    assert not any((layout.run_dir(s) / "final_checkpoint.txt").exists() for s in STAGES)  # node 0 records them
    assert not layout.lock_file.exists()  # node 0 holds the output folder's lock


# --------------------------------------------------------------------------- test.sh
def trained(layout: Layout) -> None:
    """What train.sh leaves for the final run, through its own bookkeeping (tools.model.checkpoint start, a
    checkpoint-1, finish)."""
    from tools.model.checkpoint import finish, start

    for stage in STAGES:
        (start(layout, stage, "final") / "checkpoint-1").mkdir()
        finish(layout, stage, "final")


def test_test_sh_scores_on_every_gpu(tmp_path):
    out, layout = prepared(tmp_path)
    trained(layout)
    log = run_gpu_script("test.sh", tmp_path, out, gpus=2)
    assert "several GPUs visible: scoring with SCORE_GPUS=all, one process per GPU" in log
    # no more CUDA_VISIBLE_DEVICES=0: the scorer sees every GPU and deals the rows out (tools/model/shards.py)
    assert dist_calls(tmp_path, "score") == [{"SCORE_GPUS": "all"}]
    assert len(score_calls(tmp_path)) == 1
    run_gpu_script("test.sh", tmp_path, out, gpus=2, SCORE_GPUS="1")
    assert dist_calls(tmp_path, "score") == [{"SCORE_GPUS": "1"}] and len(score_calls(tmp_path)) == 1
    before = tree_state(out)
    log = run_gpu_script("test.sh", tmp_path, out, rc=1, SCORE_GPUS="0")
    assert "SCORE_GPUS='0': expected all (one scoring process per visible GPU), or a whole number >= 1" in log
    assert tree_state(out) == before and score_calls(tmp_path) == []
