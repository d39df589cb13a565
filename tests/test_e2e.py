"""The four scripts end to end on a reduced demo: data-pre.sh, train.sh, test.sh (init.sh is what CI ran)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.data.lists import read_list
from tools.task import LABELS, Layout

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def run(script: str, env: dict, *args: str, **more_env: str) -> str:
    proc = subprocess.run(["bash", str(ROOT / script), *args], env={**env, **more_env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_four_scripts_on_reduced_demo(tmp_path):
    env = {**os.environ, "VENV": sys.prefix, "OUTPUT_DIR": str(tmp_path / "out"),
           "DEMO_DATA_DIR": str(tmp_path / "demo"), "DEMO_MODELS_DIR": str(tmp_path / "models"),
           "DEMO_QUICK": "1", "DEMO_TRAIN": "60", "DEMO_TEST": "30",
           "EPOCHS_STAGE1": "1", "EPOCHS_STAGE2": "1", "BATCH_SIZE": "8"}
    out = run("data-pre.sh", env)
    assert "validate, prepare the images, split done" in out and "高风险" in out
    assert "augment the training split done" in out and "compose the stage sets done" in out
    layout = Layout(tmp_path / "out")
    assert layout.split_record.exists() and layout.augment_report.exists() and layout.manifest.exists()
    out = run("train.sh", env, "--lora_rank", "4")  # extra flags reach swift sft and override ours
    assert "stage1 (" in out and "stage2 (" in out
    for stage in ("stage1", "stage2"):
        pointer = (tmp_path / "out" / stage / "final_checkpoint.txt").read_text().strip()
        assert pointer.startswith("checkpoint-")  # relative to the run folder
        ckpt = layout.run_dir(stage) / pointer
        assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
        assert (ckpt / "optimizer.pt").exists()  # --save_only_model false: what RESUME=1 needs
        assert layout.trained_on(stage).exists() and not layout.run_work_dir(stage).exists()
    out = run("train.sh", env, "--lora_rank", "4", RESUME="1")  # both finished on the current data: nothing to do
    assert "stage1: trained on the current data, kept (RESUME=1)" in out and "stage2: trained on" in out
    out = run("test.sh", env)
    assert "weighted F1" in out and "stage 1 alone" in out
    first = {stage: layout.probs(stage, "test").read_bytes() for stage in ("stage1", "stage2")}
    out = run("test.sh", env)  # scored before with the same checkpoints, rows and arguments: kept
    assert f"kept {layout.probs('stage1', 'test')}" in out and "scoring with" not in out
    assert {stage: layout.probs(stage, "test").read_bytes() for stage in first} == first

    submission = tmp_path / "out" / "b-submit.txt"
    test = read_list(tmp_path / "demo" / "B.txt", tmp_path / "demo" / "B", labelled=True, check_images=False)
    lines = submission.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "" and not lines[0].startswith("\ufeff")
    rows = [line.split("\t") for line in lines[:-1]]
    assert [r[0] for r in rows] == [s.name for s in test]  # every test image once, in list order
    assert all(len(r) == 2 and r[1] in LABELS for r in rows)
    probs = (tmp_path / "out" / "probabilities.csv").read_text(encoding="utf-8").splitlines()
    assert len(probs) == len(test) + 1
    for line in probs[1:]:
        values = [float(v) for v in line.split(",")[1:-1]]
        assert len(values) == 5 + 1 + 5  # stage 1's distribution, stage 2's p(高风险), the fused distribution
        assert sum(values[:5]) == pytest.approx(1.0, abs=1e-4) and sum(values[6:]) == pytest.approx(1.0, abs=1e-4)
        assert 0 <= values[5] <= 1
