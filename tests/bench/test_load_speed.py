"""bench/load_speed.py: which files a cold load reads, and that eviction empties the page cache of them (mincore)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from load_speed import evict, files_of, resident_share  # noqa: E402


def filesystem(path: Path) -> str:
    """The type of the mount that holds path (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        point, fstype = line.split()[1], line.split()[2]
        if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fstype
    return kind


def test_a_cold_load_reads_the_base_weights_and_the_adapter(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("model-00001-of-00001.safetensors", "config.json"):
        (base / name).write_bytes(b"x")
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    (ckpt / "args.json").write_text(json.dumps({"model_dir": str(base)}), encoding="utf-8")
    assert files_of(ckpt) == [base / "model-00001-of-00001.safetensors", ckpt / "adapter_model.safetensors",
                              ckpt / "args.json"]


def test_evicted_files_are_no_longer_resident(tmp_path):
    if filesystem(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("files in memory cannot be evicted")
    path = tmp_path / "weights.safetensors"
    path.write_bytes(os.urandom(8 << 20))
    path.read_bytes()
    assert resident_share([path]) > 0.9
    evict([path])
    assert resident_share([path]) < 0.1
    path.read_bytes()
    assert resident_share([path]) > 0.9
