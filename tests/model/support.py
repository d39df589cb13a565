"""Helpers of the model-step tests (no tests here): the tiny random Qwen2.5-VL they build, noise images of three
shapes as swift rows, a small labelled training set, a free port for torchrun, and settings the preflight passes.
tests/model/conftest.py has the `out` fixture (prepared and composed official-layout data)."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import write_image
from tools.demo.models import TinySpec, build_tiny_model
from tools.fileio import write_jsonl
from tools.task import LABELS, sft_row

TINY = TinySpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=2,
                pretrain_samples=0, pretrain_epochs=0)
# (width, height): 3136 pixels each (Qwen's minimum and the tests' max_pixels), sides multiples of 28, so neither swift
# nor the transformers processor resizes them and both see the same pixels.
SIZES = [(56, 56), (112, 28), (28, 112)]
OK_ENV = {"TORCH_DTYPE": "float32", "ATTN_IMPL": "sdpa", "USE_LIGER_KERNEL_STAGE1": "false",  # the preflight passes
          "USE_LIGER_KERNEL_STAGE2": "false", "STAGE1_TUNER": "lora", "STAGE2_TUNER": "hr_amplifier",
          "MODEL_STAGE1": "Qwen/Qwen2.5-VL-7B-Instruct", "MODEL_STAGE2": "Qwen/Qwen2.5-VL-3B-Instruct"}


def noise_rows(folder: Path, n: int, seed: int, prefix: str) -> list[dict]:
    """n unlabelled rows of noise JPEGs cycling through SIZES (<prefix><i>.jpg); row 5 asks another prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = SIZES[i % 3]
        path = folder / f"{prefix}{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
        rows.append(sft_row(path, None))
    rows[5]["messages"][0]["content"] = "<image>这是楼道吗？"
    return rows


def tiny_training_set(root: Path) -> tuple[Path, Path]:
    """(the tiny model's folder, train.jsonl): 16 plain-coloured 56x56 images, the labels in turn."""
    model = build_tiny_model(root / "tiny", TINY, seed=0)
    rng = np.random.default_rng(0)
    rows = [sft_row(write_image(root / "img" / f"{i}.jpg", tuple(int(c) for c in rng.integers(0, 255, 3)), (56, 56)),
                    LABELS[i % len(LABELS)]) for i in range(16)]
    data = root / "train.jsonl"
    write_jsonl(data, rows)
    return model, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
