"""data-pre.sh with the real tools on small data: its three steps, and the knobs FOLDS, AUGMENT (with
AUGMENT_HAZARD_HUES) and the stage-set composition (STAGE1_MIN_SHARE, STAGE2_HIGH_REPEAT, STAGE2_OTHER_RATIO)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import files_under, images_of, make_official, run_data_pre
from tools.augment.filter import cuda_available
from tools.data.images import model_size
from tools.demo.data import make_dataset
from tools.task import Layout


@pytest.fixture
def official(tmp_path) -> Path:
    return make_official(tmp_path / "data", n_per_label=6)  # val 0.25: 2 per label held out, 4 left to fold


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A small demo dataset in the official layout, with its cut-out folder (DATA_DIR/cutouts)."""
    return make_dataset(tmp_path_factory.mktemp("demo"), seed=0, n_train=60, n_test=10, workers=1)


def test_data_pre_passes_folds_and_refuses_a_bad_value(official, tmp_path):
    out = tmp_path / "out"
    env = {"DATA_DIR": str(official), "OUTPUT_DIR": str(out), "AUGMENT": "0", "VAL_RATIO": "0.25"}
    log = run_data_pre({**env, "FOLDS": "2"}, "--workers", "1")
    assert "validate, prepare the images, split done" in log and "compose the stage sets done" in log
    assert "augment the training split" not in log
    assert json.loads(Layout(out).manifest.read_text(encoding="utf-8"))["folds"] == 2
    assert Layout(out).fold_list(1).exists() and Layout(out).heldout_jsonl(1).exists()
    assert json.loads(Layout(out).manifest.read_text(encoding="utf-8"))["settings"]["folds"] == 2
    assert not (out / "pipeline.env").exists()
    for bad, message in (("0", "FOLDS='0': expected a whole number >= 1 (1 = no folds)"),
                         ("5", "FOLDS=5 (--folds): the training split has only 4")):
        log = run_data_pre({**env, "FOLDS": bad}, "--workers", "1", rc=1)
        assert message in log


def test_data_pre_composition_knobs(official, tmp_path):
    out = tmp_path / "out"
    env = {"DATA_DIR": str(official), "OUTPUT_DIR": str(out), "AUGMENT": "0", "SEED": "7"}
    run_data_pre(env)
    manifest = json.loads(Layout(out).manifest.read_text(encoding="utf-8"))
    assert manifest["composition"] == {"stage1_min_share": 0.1, "stage2_high_repeat": 3, "stage2_other_ratio": 2.0,
                                       "stage2_target": "five"}
    assert manifest["seed"] == 7 and manifest["augmentation"] is None
    env = {**env, "STAGE1_MIN_SHARE": "0.15", "STAGE2_HIGH_REPEAT": "2", "STAGE2_OTHER_RATIO": "1.5"}
    run_data_pre(env)
    manifest = json.loads(Layout(out).manifest.read_text(encoding="utf-8"))
    assert manifest["composition"] == {"stage1_min_share": 0.15, "stage2_high_repeat": 2, "stage2_other_ratio": 1.5,
                                       "stage2_target": "five"}
    assert manifest["settings"]["recipe"] == "real"
    assert manifest["settings"]["model_stage1"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert manifest["settings"]["model_stage2"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    before = files_under(out)
    for knob, bad, accepted in (("AUGMENT", "2", "expected 0 or 1"),
                                ("STAGE1_MIN_SHARE", "1", "expected empty, or a number from 0 to below 1"),
                                ("SKIP_BAD_IMAGES", "yes", "expected 0 or 1"),
                                ("STAGE2_HIGH_REPEAT", "0", "expected empty, or a whole number >= 1")):
        log = run_data_pre({**env, knob: bad}, rc=1)
        assert f"{knob}='{bad}': {accepted}" in log
        assert files_under(out) == before  # refused before any step


def test_data_pre_prepares_at_max_pixels_and_skips_bad_images_only_when_asked(official, tmp_path):
    out = tmp_path / "out"
    layout = Layout(out)
    (official / "train" / "2_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    env = {"DATA_DIR": str(official), "OUTPUT_DIR": str(out), "AUGMENT": "0", "VAL_RATIO": "0.25",
           "MAX_PIXELS": "28224"}
    log = run_data_pre(env, rc=1)
    assert "2_1.jpg" in log and "SKIP_BAD_IMAGES=1" in log and not layout.manifest.exists()
    log = run_data_pre({**env, "SKIP_BAD_IMAGES": "1"})
    assert "left out (SKIP_BAD_IMAGES=1)" in log
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    assert list(manifest["skipped_train_images"]) == ["2_1.jpg"] and manifest["max_pixels"] == 28224
    assert "2_1.jpg" not in {Path(p).name for p in images_of(layout.train_jsonl("stage1"))}
    with Image.open(layout.prepared_images("train") / "0_0.jpg") as img:  # at MAX_PIXELS, not the recipe's
        assert (img.height, img.width) == model_size(24, 32, 28224)


def test_data_pre_augment_knob(demo, tmp_path):
    out = tmp_path / "out"
    layout = Layout(out)
    env = {"DATA_DIR": str(demo), "OUTPUT_DIR": str(out), "MODEL_STAGE1": "no/such-model"}
    log = run_data_pre({**env, "AUGMENT": "0"})
    assert "augment the training split" not in log and not layout.augmented_dir.exists()
    plain = {stage: layout.train_jsonl(stage).read_bytes() for stage in ("stage1", "stage2")}
    assert all(Path(p).parent == layout.prepared_images("train") for p in images_of(layout.train_jsonl("stage1")))
    assert json.loads(layout.split_record.read_text(encoding="utf-8"))["max_pixels"] == 1003520  # the recipe's

    # on by default; real recipe without a GPU: the filter is skipped (a 7B on CPU), cut-outs from DATA_DIR
    log = run_data_pre({**env, "AUGMENT_HAZARD_HUES": "0,223.3"})
    assert "augment the training split done" in log
    report = json.loads(layout.augment_report.read_text(encoding="utf-8"))
    assert report["max_pixels"] == 1003520 and report["cutouts"] == str((demo / "cutouts").resolve())
    assert report["hazard_hues_deg"] == [0.0, 223.3]
    assert sum(report["counts"]["inserted"].values()) > 0
    if not cuda_available():
        assert report["filter"]["applied"] is False and report["filter"]["model"].startswith("skipped: no GPU")
    assert sum(str(layout.augmented_dir) in p for p in images_of(layout.train_jsonl("stage1"))) > 0
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    assert manifest["augmentation"]["split_sha256"] == report["split_sha256"]

    # off again: the rows are as before; the augmentation step's folder is its own and stays, unused
    run_data_pre({**env, "AUGMENT": "0"})
    assert {stage: layout.train_jsonl(stage).read_bytes() for stage in plain} == plain
    assert json.loads(layout.manifest.read_text(encoding="utf-8"))["augmentation"] is None
