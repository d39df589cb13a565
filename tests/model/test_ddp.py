"""Data-parallel training through swift's own torchrun path on CPUs (gloo), as train.sh starts it with
NPROC_PER_NODE=2 (issue 16): `swift sft` with the flags tools.model.distributed gives, two processes, a tiny
Qwen2.5-VL with every plugin on (the High-Risk Feature Amplifier and its optimizer, the class-weighted loss).

One optimizer step of two processes with the accumulation divided by two computes, on both processes, the gradient
that one process computes with the recipe's accumulation: the same rows (swift deals the same shuffled rows out), the
same loss normalisation (HF counts the supervised tokens over all processes), every trainable parameter (LoRA, the
amplifier's gate and attention biases) all-reduced.

Without `--use_cpu true` (which tools.model.distributed.swift_flags adds on CPUs) transformers and accelerate see no
distributed setup on a CPU (accelerate's MULTI_CPU needs cpu=True) and leave the model unwrapped: each process
computes the gradient of its own rows only and trains its own copy; the last test keeps that documented."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.model.support import free_port, tiny_training_set
from tools.model import distributed as D

PROBE = '''"""Test plugin: every process's gradients before the first optimizer step, saved to $GRAD_PROBE/<rank>.pt."""
import os

import torch
from swift.callbacks import TrainerCallback, callbacks_map


class GradProbe(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save(grads, os.path.join(os.environ["GRAD_PROBE"], os.environ.get("RANK", "single") + ".pt"))


callbacks_map["grad_probe"] = GradProbe
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    model, data = tiny_training_set(root)
    (root / "probe.py").write_text(PROBE, encoding="utf-8")
    return {"root": root, "model": model, "data": data, "probe": root / "probe.py"}


def train(setup: dict, name: str, nproc: int | None, accum: int, extra: list[str]) -> dict[str, dict]:
    """One optimizer step through the swift CLI; every process's gradients before it, by rank ("single")."""
    import torch

    from swift_plugins import plugin_files

    out = setup["root"] / name
    probe = out / "grads"
    probe.mkdir(parents=True)
    argv = [str(Path(sys.executable).parent / "swift"), "sft", "--model", str(setup["model"]),
            "--template", "qwen2_5_vl", "--check_model", "false", "--dataset", str(setup["data"]),
            "--split_dataset_ratio", "0", "--external_plugins", *map(str, plugin_files()), str(setup["probe"]),
            "--tuner_type", "hr_amplifier", "--optimizer", "hr_amplifier", "--loss_type", "weighted_ce",
            "--callbacks", "grad_probe", "--torch_dtype", "float32", "--max_pixels", "3136",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", str(accum), "--max_steps", "1",
            "--lora_dropout", "0", "--gradient_checkpointing", "true", "--eval_strategy", "no", "--save_strategy",
            "no", "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0",
            "--dataset_num_proc", "1", "--seed", "42", "--data_seed", "42", "--output_dir", str(out),
            "--add_version", "false", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "DEEPSPEED")}
    env.update(GRAD_PROBE=str(probe), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]))
    if nproc:
        env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.stem: torch.load(p) for p in sorted(probe.glob("*.pt"))}


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=1e-4, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def single(setup) -> dict:
    return train(setup, "single", None, 2, [])["single"]


def test_two_processes_compute_the_gradient_of_one(setup, single):
    flags = D.swift_flags({"NPROC_PER_NODE": "2"}, cuda=False)
    assert flags == ["--use_cpu", "true"]
    accum, note = D.split_accumulation(2, 2, 2)
    assert (accum, note) == (1, None)
    grads = train(setup, "ddp", 2, accum, flags)
    assert sorted(grads) == ["0", "1"]
    names = set(single)
    assert any("lora_A" in n for n in names) and any("attn_bias" in n for n in names) \
        and any("gate" in n for n in names)  # LoRA, the amplifier's biases and gate all train
    assert_same(grads["0"], grads["1"])  # all-reduced
    assert_same(grads["0"], single)  # the same step as one process with the recipe's accumulation


def test_without_use_cpu_the_processes_do_not_synchronise(setup, single):
    """What swift does on CPUs without --use_cpu (why swift_flags adds it): each process keeps its own gradient."""
    grads = train(setup, "unsynced", 2, 1, [])
    differs = [n for n in single if not np.allclose(grads["0"][n].numpy(), grads["1"][n].numpy(), atol=1e-6)]
    assert differs, "the processes' gradients are all-reduced now: swift_flags' --use_cpu may no longer be needed"


def test_float8_base_weights_train_under_ddp(setup, single, monkeypatch):
    """FIRESAFE_FP8_BASE=1 (swift_plugins/patches/fp8_base.py) under two processes: the float8 copies are each
    process's own and stay out of DDP's buffer broadcast; the adapter's gradients are still all-reduced, and close
    to the unconverted model's (float8 rounding: close, not equal)."""
    import torch

    monkeypatch.setenv("FIRESAFE_FP8_BASE", "1")
    accum, _ = D.split_accumulation(2, 2, 2)
    grads = train(setup, "ddp-fp8", 2, accum, D.swift_flags({"NPROC_PER_NODE": "2"}, cuda=False))
    assert sorted(grads) == ["0", "1"] and grads["0"].keys() == single.keys()
    assert_same(grads["0"], grads["1"])  # all-reduced
    flat, ref = (torch.cat([g[n].flatten() for n in sorted(single)]) for g in (grads["0"], single))
    assert not torch.equal(flat, ref)  # the float8 layers did run
    assert torch.nn.functional.cosine_similarity(flat, ref, dim=0) > 0.99
