"""tools.knobs: every knob of the four scripts checked before any work, each refusal naming the knob, its value and
the accepted range (issue 13). The scripts' own use of it is tested in tests/scripts/test_knobs_sh.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT
from tools import knobs as K


@pytest.mark.parametrize("name, value, accepted", [
    ("VAL_RATIO", "1.5", "a number between 0 and 1, both excluded"),
    ("VAL_RATIO", "0", "a number between 0 and 1, both excluded"),
    ("VAL_RATIO", "1", "a number between 0 and 1, both excluded"),
    ("VAL_RATIO", "nan", "a number between 0 and 1, both excluded"),
    ("VAL_RATIO", "", "a number between 0 and 1, both excluded"),
    ("MAX_PIXELS", "10", "a whole number from 3136 (4 visual tokens of 28x28) to 12845056 (16,384 tokens)"),
    ("MAX_PIXELS", "3135", "a whole number from 3136"),
    ("MAX_PIXELS", "12845057", "a whole number from 3136"),
    ("MAX_PIXELS", "1e6", "a whole number from 3136"),
    ("FOLDS", "x", "a whole number >= 1 (1 = no folds)"),
    ("FOLDS", "0", "a whole number >= 1 (1 = no folds)"),
    ("FOLDS", "1.0", "a whole number >= 1 (1 = no folds)"),
    ("EPOCHS_STAGE1", "0", "a number > 0 (swift accepts fractions of an epoch)"),
    ("EPOCHS_STAGE2", "-1", "a number > 0"),
    ("EPOCHS_STAGE1", "inf", "a number > 0"),
    ("SEED", "-1", "a whole number >= 0"),
    ("STAGES", "stage1 stgae2", "stage1, stage2 or both, separated by spaces"),
    ("STAGES", "stage1 stage1", "stage1, stage2 or both"),
    ("STAGES", "", "stage1, stage2 or both"),
    ("RUNS", "all", "folds, final or both, separated by spaces"),
    ("RESUME", "yes", "0 or 1"),
    ("ALLOW_STALE", "true", "0 or 1"),
    ("AUGMENT", "2", "0 or 1"),
    ("AUGMENT_FILTER", "on", "auto, 0 or 1"),
    ("TORCH_DTYPE", "bf16", "bfloat16, float16 or float32"),
    ("GRADIENT_CHECKPOINTING", "1", "true or false"),
    ("LORA_DROPOUT", "1", "a number from 0 to below 1"),
    ("WARMUP_RATIO", "1.1", "a number from 0 to 1"),
    ("BATCH_SIZE", "0", "a whole number >= 1"),
    ("SCORE_BATCH_SIZE", "4.5", "a whole number >= 1"),
    ("STAGE1_MIN_SHARE", "1", "empty, or a number from 0 to below 1"),
    ("STAGE1_MIN_SHARE", "-0.1", "empty, or a number from 0 to below 1"),
    ("FOLDS", "1_0", "a whole number >= 1"),  # int() takes it, bash's (( )) does not
    ("SEED", "4_2", "a whole number >= 0"),
    ("DEMO_TRAIN", "19", "a whole number >= 20"),
    ("FIRESAFE_AMP_ATTN", "flash", "fused (β as one more head dimension, fused SDPA kernels) or mask"),
])
def test_a_bad_value_names_the_knob_and_the_accepted_range(name, value, accepted):
    (message,) = K.problems({name: value})
    assert message.startswith(f"{name}={value!r}: expected ") and accepted in message
    assert K.KNOBS[name].what in message


@pytest.mark.parametrize("name, value", [
    ("VAL_RATIO", "0.1"), ("VAL_RATIO", " 0.25 "), ("VAL_RATIO", "0.999"),
    ("MAX_PIXELS", "3136"), ("MAX_PIXELS", "12845056"), ("MAX_PIXELS", "1003520"), ("MAX_PIXELS", "28224"),
    ("FOLDS", "1"), ("FOLDS", "5"), ("EPOCHS_STAGE1", "0.5"), ("EPOCHS_STAGE2", "3"), ("SEED", "0"),
    ("STAGES", "stage1 stage2"), ("STAGES", "stage2"), ("STAGES", "stage2  stage1"), ("RUNS", "final folds"),
    ("RUNS", "final"), ("RESUME", "1"), ("ALLOW_STALE", "0"), ("LEARNING_RATE", "3e-3"), ("LORA_DROPOUT", "0"),
    ("WARMUP_RATIO", "0"), ("STAGE1_MIN_SHARE", ""), ("STAGE1_MIN_SHARE", "0.1"), ("STAGE1_MIN_SHARE", "0.5"),
    ("STAGE1_MIN_SHARE", "0"), ("STAGE2_HIGH_REPEAT", ""), ("STAGE2_OTHER_RATIO", "0"), ("DATA_DIR", ""),
    ("TORCH_DTYPE", "bfloat16"), ("USE_LIGER_KERNEL_STAGE1", "true"), ("FIRESAFE_AMP_ATTN", "mask"),
])
def test_good_values_pass(name, value):
    assert K.problems({name: value}) == []


def test_every_value_a_recipe_sets_passes():
    """recipes/*.env: every knob they set that tools.knobs knows is within its range (the defaults never fail)."""
    for recipe in (ROOT / "recipes").glob("*.env"):
        values = dict(re.findall(r'\$\{(\w+):=([^}]*)\}', recipe.read_text(encoding="utf-8")))
        known = {k: v for k, v in values.items() if k in K.KNOBS}
        assert len(known) >= 15, recipe
        assert K.problems(known) == [], recipe


def test_paths_and_models(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    assert K.problems({"OUTPUT_DIR": str(tmp_path / "new" / "deeper")}) == []  # can be created
    assert K.problems({"OUTPUT_DIR": str(tmp_path)}) == []
    for bad in (regular, regular / "out", regular / "a" / "b"):  # a regular file, or a folder under one
        (message,) = K.problems({"OUTPUT_DIR": str(bad)})
        assert message == (f"OUTPUT_DIR={str(bad)!r}: expected a folder this user can write, or a new folder "
                           "inside one")
    assert K.problems({"DATA_DIR": str(tmp_path)}) == []
    (message,) = K.problems({"DATA_DIR": str(tmp_path / "missing")})
    assert "DATA_DIR=" in message and "a folder with the competition data (train.txt, train/, B.txt, B/)" in message
    model = tmp_path / "model"
    model.mkdir()
    (message,) = K.problems({"MODEL_STAGE1": str(model)})  # an empty folder is not a model
    assert message == f"MODEL_STAGE1={str(model)!r}: expected a model folder (with config.json) or a model id ORG/NAME"
    (model / "config.json").write_text("{}")
    assert K.problems({"MODEL_STAGE1": str(model), "MODEL_STAGE2": "Qwen/Qwen2.5-VL-3B-Instruct"}) == []
    for bad in (str(tmp_path / "missing"), "./rel/missing", "Qwen2.5-VL-7B", "a/b/c", str(regular)):
        assert K.problems({"MODEL_STAGE2": bad}) != [], bad


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_dir_that_cannot_be_written(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert K.problems({"OUTPUT_DIR": str(locked / "out")}) != []
    finally:
        locked.chmod(0o700)


def test_unknown_names_and_every_problem_at_once():
    found = K.problems({"VAL_RATIO": "0", "FOLDS": "x", "EPOCH_STAGE1": "3", "SEED": "1"})
    assert [m.split("=")[0].split(":")[0] for m in found] == ["VAL_RATIO", "FOLDS", "EPOCH_STAGE1"]
    assert found[2].startswith("EPOCH_STAGE1: not a knob of this project (known: ALLOW_STALE, ")


def test_cli(capsys):
    assert K.main(["VAL_RATIO=0.1", "FOLDS=2", "STAGES=stage1 stage2"]) == 0
    assert capsys.readouterr().err == ""
    assert K.main(["VAL_RATIO=1.5", "MAX_PIXELS=10", "SEED=3"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: VAL_RATIO='1.5': expected " + K.KNOBS["VAL_RATIO"].what,
                   "error: MAX_PIXELS='10': expected " + K.KNOBS["MAX_PIXELS"].what]
    assert K.main(["VAL_RATIO"]) == 2 and "expected NAME=VALUE" in capsys.readouterr().err
    assert K.main(["DATA_DIR="]) == 0  # an empty value is a value (DATA_DIR: the demo)
    assert K.main(["--help"]) == 0 and "python -m tools.knobs" in capsys.readouterr().out
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tools.knobs", "FOLDS=x"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and proc.stderr == f"error: FOLDS='x': expected {K.KNOBS['FOLDS'].what}\n"
    assert time.monotonic() - start < 10  # no torch, no swift: well under a second on an idle machine


def test_a_switch_reads_0_or_1_and_falls_back_to_its_default(monkeypatch):
    """K.switch: the 0/1 knobs read inside a process (swift_plugins' patches, tools.model.prefetch)."""
    switch = K.switch
    monkeypatch.delenv("FIRESAFE_TEST_SWITCH", raising=False)
    assert switch("FIRESAFE_TEST_SWITCH", "a test") is False
    assert switch("FIRESAFE_TEST_SWITCH", "a test", default=True) is True
    monkeypatch.setenv("FIRESAFE_TEST_SWITCH", "0")
    assert switch("FIRESAFE_TEST_SWITCH", "a test", default=True) is False
    monkeypatch.setenv("FIRESAFE_TEST_SWITCH", "2")
    with pytest.raises(ValueError, match=r"FIRESAFE_TEST_SWITCH='2': expected 0 or 1 \(a test\)"):
        switch("FIRESAFE_TEST_SWITCH", "a test", default=True)
