"""Every knob is checked before any work (issue 13): a bad value makes data-pre.sh, train.sh or test.sh exit 1 in
seconds with a message naming the knob and the accepted range, and nothing is written (data-pre.sh does not even
create the output folder). The ranges themselves: tests/test_knobs.py."""
from __future__ import annotations

import time

import pytest

from tests.helpers import (fake_model, fake_trained, list_pairs, make_official, prepared, run_data_pre, run_script,
                           score_calls, swift_calls, tree_state)
from tools.task import LABELS, Layout

ACCEPTED = {
    "VAL_RATIO": "expected a number between 0 and 1, both excluded",
    "MAX_PIXELS": "expected a whole number from 3136 (4 visual tokens of 28x28) to 12845056 (16,384 tokens)",
    "FOLDS": "expected a whole number >= 1 (1 = no folds)",
    "OUTPUT_DIR": "expected a folder this user can write, or a new folder inside one",
    "MODEL_STAGE1": "expected a model folder (with config.json) or a model id ORG/NAME",
    "MODEL_STAGE2": "expected a model folder (with config.json) or a model id ORG/NAME",
    "DATA_DIR": "expected a folder with the competition data (train.txt, train/, B.txt, B/), or empty for the demo",
    "EPOCHS_STAGE1": "expected a number > 0",
    "EPOCHS_STAGE2": "expected a number > 0",
    "LORA_RANK": "expected a whole number >= 1",
    "RESUME": "expected 0 or 1",
    "ALLOW_STALE": "expected 0 or 1",
    "SCORE_BATCH_SIZE": "expected a whole number >= 1",
    "SEED": "expected a whole number >= 0",
    "AUGMENT": "expected 0 or 1",
}


@pytest.mark.parametrize("knob, bad", [
    ("VAL_RATIO", "1.5"), ("VAL_RATIO", "0"), ("MAX_PIXELS", "10"), ("FOLDS", "x"), ("OUTPUT_DIR", "{file}/out"),
    ("MODEL_STAGE1", "{empty}"), ("MODEL_STAGE2", "{missing}"), ("DATA_DIR", "{missing}"), ("SEED", "-3"),
])
def test_data_pre_checks_each_knob_before_any_work(tmp_path, knob, bad):
    data = make_official(tmp_path / "data", n_per_label=6)
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "empty").mkdir()
    bad = bad.format(file=tmp_path / "file", empty=tmp_path / "empty", missing=tmp_path / "missing")
    out = tmp_path / "out"
    env = {"DATA_DIR": str(data), "OUTPUT_DIR": str(out), "AUGMENT": "0", "VAL_RATIO": "0.25",
           "MODEL_STAGE1": str(fake_model(tmp_path / "m1")), "MODEL_STAGE2": str(fake_model(tmp_path / "m2")),
           knob: bad}
    start = time.monotonic()
    log = run_data_pre(env, rc=1)
    assert time.monotonic() - start < 30  # seconds, not an image check or a demo build (about 1 s on an idle machine)
    assert f"{knob}={bad!r}: {ACCEPTED[knob]}" in log
    assert "Traceback" not in log and "validate, prepare the images, split" not in log
    assert not out.exists() and (tmp_path / "file").is_file()  # nothing written, no output folder
    assert not (tmp_path / "missing").exists()


def test_data_pre_reports_every_bad_knob_at_once(tmp_path):
    out = tmp_path / "out"
    log = run_data_pre({"DATA_DIR": str(tmp_path / "missing"), "OUTPUT_DIR": str(out), "VAL_RATIO": "0",
                        "FOLDS": "x", "AUGMENT": "yes"}, rc=1)
    for knob in ("DATA_DIR", "VAL_RATIO", "FOLDS", "AUGMENT"):
        assert f"error: {knob}=" in log and ACCEPTED[knob] in log
    assert not out.exists()


@pytest.mark.parametrize("knob, bad", [
    ("EPOCHS_STAGE1", "0"), ("EPOCHS_STAGE2", "-1"), ("MAX_PIXELS", "10"), ("LORA_RANK", "0"), ("RESUME", "2"),
    ("ALLOW_STALE", "yes"), ("MODEL_STAGE1", "{empty}"), ("FOLDS", "x"), ("SEED", "x"),
])
def test_train_sh_checks_each_knob_before_any_work(tmp_path, knob, bad):
    out, layout = prepared(tmp_path)
    (tmp_path / "empty").mkdir()
    bad = bad.format(empty=tmp_path / "empty")
    before = tree_state(out)
    start = time.monotonic()
    log = run_script("train.sh", tmp_path, out, rc=1, **{knob: bad})
    assert time.monotonic() - start < 30
    assert f"{knob}={bad!r}: {ACCEPTED[knob]}" in log
    assert swift_calls(tmp_path) == [] and tree_state(out) == before


@pytest.mark.parametrize("knob, bad", [("SCORE_BATCH_SIZE", "0"), ("MAX_PIXELS", "10"), ("ALLOW_STALE", "2"),
                                       ("FOLDS", "x")])
def test_test_sh_checks_each_knob_before_any_work(tmp_path, knob, bad):
    out, layout = prepared(tmp_path)
    fake_trained(layout)
    before = tree_state(out)
    log = run_script("test.sh", tmp_path, out, rc=1, **{knob: bad})
    assert f"{knob}={bad!r}: {ACCEPTED[knob]}" in log
    assert score_calls(tmp_path) == [] and tree_state(out) == before


def test_train_and_test_sh_need_data_pre_first(tmp_path):
    out = tmp_path / "out"
    for script in ("train.sh", "test.sh"):
        log = run_script(script, tmp_path, out, rc=1)
        assert f"{out / 'data' / 'manifest.json'}: not found: run data-pre.sh first" in log
    assert not out.exists() and swift_calls(tmp_path) == [] and score_calls(tmp_path) == []


def test_a_tiny_val_ratio_still_validates_on_every_label(tmp_path):
    """VAL_RATIO=0 was swift's bare StopIteration (no validation rows); any ratio in range gives each label with two
    or more images at least one validation image and keeps one for training."""
    data = make_official(tmp_path / "data", n_per_label=6)
    out = tmp_path / "out"
    env = {"DATA_DIR": str(data), "OUTPUT_DIR": str(out), "AUGMENT": "0", "VAL_RATIO": "0.001",
           "MODEL_STAGE1": str(fake_model(tmp_path / "m1")), "MODEL_STAGE2": str(fake_model(tmp_path / "m2"))}
    run_data_pre(env)
    layout = Layout(out)
    assert sorted(label for _, label in list_pairs(layout.val_list)) == sorted(LABELS)
    assert sorted(label for _, label in list_pairs(layout.train_split)) == sorted(LABELS * 5)
