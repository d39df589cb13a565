"""Several GPUs without torchrun: train.sh trains on one GPU (swift's default device_map would split the 7B across
all of them as a slow pipeline) unless NPROC_PER_NODE or CUDA_VISIBLE_DEVICES says otherwise."""
from __future__ import annotations

from pathlib import Path

from tests.helpers import install_fakes, prepared, run_script, swift_calls

TWO_GPUS = """#!/usr/bin/env bash
[[ "$1" == -L ]] && printf 'GPU 0: NVIDIA H200 (UUID: a)\\nGPU 1: NVIDIA H200 (UUID: b)\\n'
"""


def two_gpus(tmp_path: Path) -> Path:
    """tmp_path with prepared data, and an nvidia-smi beside the fakes (first on PATH) that lists two GPUs."""
    out, _ = prepared(tmp_path)
    smi = install_fakes(tmp_path) / "nvidia-smi"
    smi.write_text(TWO_GPUS)
    smi.chmod(0o755)
    return out


def test_two_gpus_and_no_torchrun_train_on_gpu_0(tmp_path):
    out = two_gpus(tmp_path)
    log = run_script("train.sh", tmp_path, out, RUNS="final")
    assert "2 GPUs and no NPROC_PER_NODE: training on GPU 0 (CUDA_VISIBLE_DEVICES=0)" in log
    assert len(swift_calls(tmp_path)) == 2  # both stages trained


def test_torchrun_or_a_chosen_gpu_is_left_alone(tmp_path):
    out = two_gpus(tmp_path)
    for env in ({"CUDA_VISIBLE_DEVICES": "1"}, {"NPROC_PER_NODE": "2"}):
        log = run_script("train.sh", tmp_path, out, RUNS="final", **env)
        assert "training on GPU 0" not in log
