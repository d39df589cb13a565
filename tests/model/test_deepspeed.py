"""DeepSpeed ZeRO-2 with the plugins, two CPU processes through swift's CLI (issue 16). Skipped where deepspeed does
not import (it is the optional extra `deepspeed`; CI does not install it). Run it with deepspeed 0.18 on the path, e.g.
`pip install --target /tmp/ds deepspeed==0.18.9 hjson py-cpuinfo msgpack ninja einops --no-deps` and
`PYTHONPATH=/tmp/ds:. pytest tests/model/test_deepspeed.py`.

What it shows, with the hr_amplifier tuner, its optimizer, the weighted_ce loss and the stats callback:
- under ZeRO-2 swift checkpoints reentrantly (use_reentrant True) and the amplifier's parameters, one attention bias
  per biased layer, get one gradient each per backward: no "gradient computed twice" assertion, and the first
  step's gradient norm is one process's with the recipe's accumulation;
- the checkpoint is a DeepSpeed one (global_step*/, a ZeRO shard per process: tools.model.distributed reads that
  layout for RESUME=1), with the amplifier's trained weights; it resumes, and it scores without DeepSpeed.

On CPUs DeepSpeed needs what train.sh never passes there (its preflight refuses DEEPSPEED without CUDA): --use_cpu
(accelerate's MULTI_CPU), --fp16 false (swift turns fp16 on for a float32 model; DeepSpeed's CPU accelerator has no
fp16) and, through a sitecustomize here, all_gather instead of all_gather_into_tensor (torch's gloo fallback rejects
DeepSpeed's split views). ZeRO-3 does not start on CPUs this way (its zero.Init at model load sees one process) and
is left to the GPU benchmark (bench/multi_gpu.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

deepspeed = pytest.importorskip("deepspeed")

from tests.model.support import free_port, tiny_training_set  # noqa: E402
from tools.model import distributed as D  # noqa: E402

SITECUSTOMIZE = '''import importlib
try:
    importlib.import_module("deepspeed.comm.torch").TorchBackend.has_all_gather_into_tensor = lambda self: False
except ImportError:
    pass
'''
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    if D._release(deepspeed.__version__) >= (0, 19):
        pytest.skip(f"deepspeed {deepspeed.__version__}: ZeRO-2 cannot start with the amplifier's scalar parameters "
                    "(tests/model/test_distributed.py); the extra pins <0.19")
    root = tmp_path_factory.mktemp("ds")
    model, data = tiny_training_set(root)
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return {"root": root, "model": model, "data": data}


def sft(setup: dict, out: Path, nproc: int | None, accum: int, steps: int, *extra: str) -> list[dict]:
    """swift sft through its CLI with every plugin; returns logging.jsonl's rows."""
    from swift_plugins import plugin_files

    argv = [str(Path(sys.executable).parent / "swift"), "sft", "--model", str(setup["model"]),
            "--template", "qwen2_5_vl", "--check_model", "false", "--dataset", str(setup["data"]),
            "--split_dataset_ratio", "0", "--external_plugins", *map(str, plugin_files()),
            "--tuner_type", "hr_amplifier", "--optimizer", "hr_amplifier", "--loss_type", "weighted_ce",
            "--callbacks", "amplifier_stats", "--torch_dtype", "float32", "--max_pixels", "3136",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", str(accum),
            "--max_steps", str(steps), "--lora_dropout", "0", "--gradient_checkpointing", "true",
            "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", str(steps), "--logging_steps", "1",
            "--report_to", "none", "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--seed", "42",
            "--data_seed", "42", "--output_dir", str(out), "--add_version", "false", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "DEEPSPEED")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(setup["root"] / "site"), str(ROOT), env.get("PYTHONPATH", "")]))
    if nproc:
        env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "gradient computed twice" not in proc.stdout + proc.stderr
    return [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines() if line.strip()]


ZERO2_CPU = ("--deepspeed", "zero2", "--use_cpu", "true", "--fp16", "false")


@pytest.fixture(scope="module")
def zero2(setup) -> dict:
    out = setup["root"] / "zero2"
    logs = sft(setup, out, 2, 1, 2, *ZERO2_CPU)
    return {"out": out, "logs": logs}


def grad_norms(logs: list[dict]) -> list[float]:
    return [float(r["grad_norm"]) for r in logs if "grad_norm" in r]


def test_zero2_trains_the_amplifier_with_reentrant_checkpointing(setup, zero2):
    single = sft(setup, setup["root"] / "single", None, 2, 1)
    # one step of 2 processes x accumulation 1 = one process x accumulation 2: the same rows, the same gradient
    assert grad_norms(zero2["logs"])[0] == pytest.approx(grad_norms(single)[0], rel=1e-4)
    amp = next(r for r in reversed(zero2["logs"]) if "amp/attn_bias_absmax" in r)
    assert float(amp["amp/attn_bias_absmax"]) > 0  # the stats callback read the trained biases

    ckpt = zero2["out"] / "checkpoint-2"
    assert D.checkpoint_layout(ckpt) == {"deepspeed": True, "zero_stage": None, "processes": 2}
    import safetensors.torch

    weights = safetensors.torch.load_file(str(ckpt / "amplifier.safetensors"))
    assert {k for k in weights if k.startswith("attn_bias.")} and all(v.numel() for v in weights.values())
    assert max(float(v.abs().max()) for k, v in weights.items() if k.startswith("attn_bias.")) > 0
    assert D.resume_problems(ckpt, {"NPROC_PER_NODE": "2", "DEEPSPEED": "zero2"}) == []
    assert D.resume_problems(ckpt, {"NPROC_PER_NODE": "2"})  # RESUME=1 without DEEPSPEED is refused


def test_a_zero2_checkpoint_resumes_and_scores(setup, zero2, tmp_path):
    ckpt = zero2["out"] / "checkpoint-2"
    logs = sft(setup, zero2["out"], 2, 1, 3, *ZERO2_CPU, "--resume_from_checkpoint", str(ckpt))
    assert [r["global_step/max_steps"] for r in logs if "grad_norm" in r][-1] == "3/3"  # continued at step 3
    from tools.model.score import main as score

    assert score(["--checkpoint", str(ckpt), "--dataset", str(setup["data"]), "--output", str(tmp_path / "p.csv"),
                  "--batch-size", "8", "--", "--max_pixels", "3136"]) == 0
    from tools.probs import read_probs

    names, probs = read_probs(tmp_path / "p.csv")
    assert len(names) == 16 and np.allclose(probs.sum(1), 1, atol=1e-5)
