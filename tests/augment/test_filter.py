"""tools.augment.filter: the consistency rule on any scorer, its prior-corrected form, and the choice of model."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_samples
from tools.augment import filter as F
from tools.augment.images import list_cutouts, load_image
from tools.augment.plan import AugmentJob, job_seed
from tools.augment.render import run_plan
from tools.augment.transforms import hazard_mask
from tools.data.lists import Sample
from tools.fileio import write_json
from tools.model.checkpoint import write_pointer
from tools.task import HIGH_RISK, LABEL_TO_INDEX, LABELS, Layout

SMALL = 224 * 168  # max_pixels for the tests: a 224² demo image becomes 196×196


def fake_scorer(inserted: dict[str, str]):
    """A stand-in for the model that measures real things. For an insertion record (path → its source's
    path in `inserted`) p(高风险) is the increase in hazard-coloured pixels over the source (×400, capped at
    1); for anything else p(label) grows with mean brightness, so an all-black image scores 0."""
    def share(path) -> float:
        return float(hazard_mask(np.asarray(Image.open(path).convert("RGB"))).mean())

    def score(paths: list[str], labels: list[str]) -> np.ndarray:
        out = []
        for path, label in zip(paths, labels):
            if label == HIGH_RISK and path in inserted:
                out.append(min(1.0, max(0.0, 400 * (share(path) - share(inserted[path])))))
            else:
                out.append(min(1.0, 1.5 * np.asarray(Image.open(path).convert("L")).mean() / 255))
        return np.array(out)

    return score


def test_filter_drops_corrupted_samples_and_keeps_clean_ones(tmp_path, cutouts):
    samples = write_samples(tmp_path / "train", ["无风险", "低风险", "非楼道", "高风险"])
    jobs = [AugmentJob(s, 1, job_seed(0, s.name, 1), ("geometric", "colour")) for s in samples]
    cut = str(list_cutouts(cutouts)[0])
    jobs.append(AugmentJob(samples[0], 2, job_seed(0, samples[0].name, 2), ("insert",), cut))
    records = run_plan(jobs, tmp_path / "aug", workers=1, max_pixels=SMALL, progress=False)
    originals = [j.sample for j in jobs]
    # corrupt two: an all-black 低风险 copy, and a "high-risk" insertion copy that shows no hazard
    cv2.imwrite(str(records[1].path), np.zeros((196, 196, 3), np.uint8))
    bad_insert = tmp_path / "aug" / "img00_aug3.jpg"
    Image.fromarray(load_image(samples[0].path, SMALL)).save(bad_insert, quality=90)
    records.append(Sample("img00_aug3.jpg", bad_insert, HIGH_RISK, "augment:x"))
    originals.append(samples[0])
    score = fake_scorer({str(records[4].path): str(samples[0].path), str(bad_insert): str(samples[0].path)})

    kept, dropped = F.consistency_filter(records, originals, score, ratio=0.5)
    assert [r.name for r in kept] == ["img00_aug1.jpg", "img02_aug1.jpg", "img03_aug1.jpg", "img00_aug2.jpg"]
    assert dropped == {"高风险": 1, "中风险": 0, "低风险": 1, "无风险": 0, "非楼道": 0}
    # the mapping form gives the same; a stricter ratio drops more
    kept2, _ = F.consistency_filter(records, {r.name: o for r, o in zip(records, originals)}, score, 0.5)
    assert kept2 == kept
    assert len(F.consistency_filter(records, originals, score, ratio=1.5)[0]) < len(kept)
    with pytest.raises(ValueError):
        F.consistency_filter(records, originals, lambda p, l: np.ones(1))


def test_consistency_filter_edge_cases():
    a, b = Sample("a.jpg", Path("/a.jpg"), "无风险", "t"), Sample("a_aug1.jpg", Path("/b.jpg"), "无风险", "x")
    assert F.consistency_filter([], [], lambda p, l: []) == ([], dict.fromkeys(LABELS, 0))
    with pytest.raises(ValueError, match="1 records but 2 originals"):
        F.consistency_filter([b], [a, a], lambda p, l: np.ones(len(p)))
    nan = F.consistency_filter([b], [a], lambda p, l: np.array([np.nan if p[0] == "/b.jpg" else 0.5]))
    assert nan == ([], {**dict.fromkeys(LABELS, 0), "无风险": 1})  # a NaN score drops the record
    calls = []

    def scorer(paths, labels):
        calls.append(list(paths))
        return np.full(len(paths), 0.5)

    F.consistency_filter([b, b], [a, a], scorer)  # the originals are scored once each
    assert calls == [["/b.jpg", "/b.jpg"], ["/a.jpg"]]


BLIND = np.array([0.05, 0.1, 0.1, 0.7, 0.05])  # an image-blind model that leans on 无风险


def test_prior_correction_only_matters_when_the_label_changes():
    orig = {label: Sample(f"{label}.jpg", Path(f"/o/{label}.jpg"), label, "t") for label in LABELS}
    recs = [Sample("a_aug1.jpg", Path("/a/1.jpg"), "无风险", "x"),  # keeps 0.6 of p(无风险): kept
            Sample("a_aug2.jpg", Path("/a/2.jpg"), "无风险", "x"),  # 0.4: dropped
            Sample("a_aug3.jpg", Path("/a/3.jpg"), HIGH_RISK, "x"),  # insertion, no hazard evidence: kept
            Sample("a_aug4.jpg", Path("/a/4.jpg"), HIGH_RISK, "x")]  # insertion the model reads as 非楼道: dropped
    srcs = [orig["无风险"]] * 4
    vec = {str(orig[label].path): BLIND for label in LABELS}
    vec["/a/1.jpg"] = BLIND * [1, 1, 1, 0.6, 1]
    vec["/a/2.jpg"] = BLIND * [1, 1, 1, 0.4, 1]
    vec["/a/3.jpg"] = BLIND
    vec["/a/4.jpg"] = np.array([0.01, 0.01, 0.01, 0.01, 0.96])
    calls = []

    def model(paths):
        calls.append(len(paths))
        return np.array([vec[p] for p in paths])

    kept, dropped, prior = F.filter_records(recs, srcs, model, 0.5, prior_images=list(orig.values()))
    assert [r.name for r in kept] == ["a_aug1.jpg", "a_aug3.jpg"] and dropped[HIGH_RISK] == 1 and dropped["无风险"] == 1
    assert prior == pytest.approx(BLIND) and calls == [4 + 5]  # every distinct image scored once
    # the raw rule would drop the blind model's insertion copy: p(高风险) 0.05 < 0.5 × p(无风险) 0.7
    raw = F.consistency_filter(recs, srcs, lambda ps, ls: [vec[p][LABEL_TO_INDEX[lab]] for p, lab in zip(ps, ls)])
    assert "a_aug3.jpg" not in [r.name for r in raw[0]]
    with pytest.raises(ValueError, match="shape"):
        F.filter_records(recs, srcs, lambda paths: np.ones((len(paths), 4)))
    assert F.filter_records([], [], model)[0] == []


def test_the_filter_model_choice(tmp_path, monkeypatch):
    layout = Layout(tmp_path / "out")
    monkeypatch.setattr(F, "cuda_available", lambda: False)
    argv, what = F.choose_filter_model("auto", layout, "/models/base", "demo", "float32", 28224)
    assert argv == ["--model", "/models/base", "--template", "qwen2_5_vl", "--torch_dtype", "float32",
                    "--max_pixels", "28224"] and "base model" in what
    assert F.choose_filter_model("0", layout, "/models/base", "demo", None, 28224)[0] is None
    argv, what = F.choose_filter_model("auto", layout, "Qwen/Qwen2.5-VL-7B-Instruct", "real", "bfloat16", 1003520)
    assert argv is None and what.startswith("skipped: no GPU")
    assert F.choose_filter_model("1", layout, "Qwen/Qwen2.5-VL-7B-Instruct", "real", "bfloat16", 1003520)[0]
    monkeypatch.setattr(F, "cuda_available", lambda: True)
    assert F.choose_filter_model("auto", layout, "Qwen/Qwen2.5-VL-7B-Instruct", "real", None, 1003520)[0]
    assert F.choose_filter_model("auto", layout, None, "demo", None, 28224) == (
        None, "skipped: no stage-1 checkpoint and no --model-stage1")
    with pytest.raises(ValueError, match="needs --model-stage1"):
        F.choose_filter_model("1", layout, None, "demo", None, 28224)
    with pytest.raises(ValueError, match="filter mode"):
        F.choose_filter_model("yes", layout, None, "demo", None, 28224)

    ckpt = layout.run_dir("stage1") / "checkpoint-7"  # a train.sh run before: its checkpoint is preferred
    ckpt.mkdir(parents=True)
    write_json(ckpt / "args.json", {"model": "/models/base"})
    layout.checkpoint_pointer("stage1").write_text("checkpoint-7\n", encoding="utf-8")  # relative, as train.sh
    argv, what = F.choose_filter_model("auto", layout, "/models/base", "demo", "float32", 28224)
    assert argv == ["--adapters", str(ckpt.resolve()), "--max_pixels", "28224"] and "checkpoint" in what
    argv, what = F.choose_filter_model("auto", layout, "/models/other", "demo", "float32", 28224)
    assert argv[:2] == ["--model", "/models/other"] and "not /models/other" in what  # trained from another model


def test_trained_stage1(tmp_path):
    layout = Layout(tmp_path / "out")
    assert F.trained_stage1(layout, "/models/base") == (None, "no stage-1 checkpoint")
    ckpt = layout.run_dir("stage1") / "checkpoint-3"
    ckpt.mkdir(parents=True)
    assert write_pointer(layout.run_dir("stage1")) == ckpt.resolve()
    # no args.json: nothing to check it against
    assert F.trained_stage1(layout, "/models/base") == (ckpt.resolve(), f"stage-1 checkpoint {ckpt.resolve()}")
    (tmp_path / "base").mkdir()
    write_json(ckpt / "args.json", {"model": "base", "model_dir": str((tmp_path / "base").resolve())})
    assert F.trained_stage1(layout, str(tmp_path / "base"))[0] == ckpt.resolve()  # matched by the resolved folder
    assert F.trained_stage1(layout, "/elsewhere")[0] is None
    assert F.trained_stage1(layout, None)[0] == ckpt.resolve()  # no model named: any checkpoint will do
