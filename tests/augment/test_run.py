"""tools.augment.run, step 2 of data-pre.sh: copies only of the training split, written only to data/augmented/,
then (tools.compose.stage_sets --augment 1) only into the training JSONLs; the consistency filter wired to a
scorer (a fake, and tools.model.score on a tiny Qwen2.5-VL); the CLI."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, compose, files_under, images_of, list_pairs, prepare
from tools.augment import filter as F
from tools.augment import run as R
from tools.augment.plan import INSERT_SOURCES
from tools.augment.record import read_index, split_digest
from tools.data.lists import Sample, read_list
from tools.demo.data import make_dataset
from tools.demo.models import SPECS, build_tiny_model
from tools.fileio import read_jsonl
from tools.task import HIGH_RISK, LABELS, Layout

DEMO_PIXELS = 28224  # recipes/demo.env


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A small demo dataset in the official layout, with its cut-out folder (DATA_DIR/cutouts)."""
    return make_dataset(tmp_path_factory.mktemp("demo"), seed=0, n_train=60, n_test=10, workers=1)


def with_one_more(demo: Path, data: Path, label: str) -> Path:
    """A copy of the demo data with one more training image of `label` (a copy of the first one, another name)."""
    shutil.copytree(demo, data)
    name = next(n for n, lab in list_pairs(data / "train.txt") if lab == label)
    shutil.copyfile(data / "train" / name, data / "train" / f"extra_{name}")
    with open(data / "train.txt", "a", encoding="utf-8") as f:
        f.write(f"extra_{name}\t{label}\n")
    return data


def prepared(data: Path, out: Path, *extra: str) -> Layout:
    prepare(data, out, *extra)
    return Layout(out)


def augment_args(out: Path, *extra: str):
    return R.build_parser().parse_args(["--output-dir", str(out), "--max-pixels", str(DEMO_PIXELS), "--workers", "1",
                                        "--no-progress", *extra])


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def outside_augmented(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in files_under(out).items() if not k.startswith("data/augmented/")}


def test_copies_come_from_the_training_split_and_go_only_to_training_rows(demo, tmp_path):
    out = tmp_path / "out"
    layout = prepared(demo, out)
    compose(out)  # a plain run first: the augmentation step must not touch its files
    before = outside_augmented(out)
    report = R.augment(augment_args(out, "--cutouts", str(demo / "cutouts"), "--filter", "0"))
    assert outside_augmented(out) == before  # it writes data/augmented/ only
    assert set(files_under(layout.augmented_dir)) >= {"augmented.txt", "index.tsv", "report.json", "contact_sheet.png"}
    assert report == json.loads(layout.augment_report.read_text(encoding="utf-8"))
    assert report["split_sha256"] == hashlib.sha256(layout.train_split.read_bytes()).hexdigest() == split_digest(layout)
    compose(out, "--augment", "1")
    aug = layout.augmented_images
    index = read_index(layout.augmented_index)
    copies = {str((aug / r["image"]).resolve()) for r in index}
    assert len(index) == sum(report["counts"]["copies"].values()) > 0

    # validation and test rows are untouched; no copy is in them, and no validation image is a source
    for p in (layout.val_jsonl("stage1"), layout.val_jsonl("stage2"), layout.test_jsonl, layout.val_list):
        assert p.read_bytes() == before[str(p.relative_to(out))]
    val_names = {name for name, _ in list_pairs(layout.val_list)}
    for path in (layout.val_jsonl("stage1"), layout.val_jsonl("stage2"), layout.test_jsonl):
        assert not any(str(layout.augmented_dir) in p for p in images_of(path))
    sources = {r["source"] for r in index}
    fit = read_list(layout.train_split, demo / "train", labelled=True, check_images=False)
    assert sources <= {s.name for s in fit} and sources.isdisjoint(val_names)
    assert not {Path(n).stem for n in val_names} & {r["image"].rsplit("_aug", 1)[0] for r in index}

    # stage 1 gets every copy once; stage 2's 高风险 block takes copies instead of repeats
    stage1, stage2 = images_of(layout.train_jsonl("stage1")), images_of(layout.train_jsonl("stage2"))
    assert copies == {p for p in stage1 if str(layout.augmented_dir) in p}
    high1 = Counter(r["images"][0] for r in read_jsonl(layout.train_jsonl("stage1"))
                    if r["messages"][1]["content"] == HIGH_RISK)
    assert set(high1.values()) == {1}  # 高风险 is over its 10 % share with the copies: no plain repeat
    high2 = [r["images"][0] for r in read_jsonl(layout.train_jsonl("stage2"))
             if r["messages"][1]["content"] == HIGH_RISK]
    n_high = sum(s.label == HIGH_RISK for s in fit)
    assert len(high2) == 3 * n_high and len(set(high2)) == len(high2) and set(high2) & copies
    assert all(p in copies or Path(p).parent == layout.prepared_images("train") for p in stage2)

    # labels: an insertion copy is 高风险 from a 无风险/低风险 source; any other keeps its source's label
    inserted = [r for r in index if "insert" in r["transforms"]]
    assert len(inserted) == 2 * n_high
    assert all(r["label"] == HIGH_RISK and r["source_label"] in INSERT_SOURCES for r in inserted)
    assert all(r["label"] == r["source_label"] for r in index if r not in inserted)
    rows = {r["images"][0]: r["messages"][1]["content"] for r in read_jsonl(layout.train_jsonl("stage1"))}
    assert all(rows[str((aug / r["image"]).resolve())] == r["label"] for r in index)

    # at the model's size; listed; counted in the manifest; a contact sheet
    for p in list(copies)[:20]:
        with Image.open(p) as im:
            assert im.width % 28 == 0 and im.height % 28 == 0 and im.width * im.height <= DEMO_PIXELS
    listed = read_list(layout.augmented_list, aug, labelled=True, progress=False)
    assert {str(s.path) for s in listed} == copies
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    assert manifest["augmentation"]["counts"]["kept"] == report["counts"]["kept"]
    assert sum(manifest["counts"]["stage1_rows"].values()) == len(stage1)
    assert report["filter"]["applied"] is False and report["max_pixels"] == DEMO_PIXELS
    assert report["hazard_hues_deg"] == [0.0, 27.3, 50.2, 223.3]
    with Image.open(layout.contact_sheet) as im:
        assert im.format == "PNG" and im.height > 5 * 160

    # the same seed gives the same bytes and the same rows
    first, jsonl = digests(aug), layout.train_jsonl("stage1").read_bytes()
    R.augment(augment_args(out, "--cutouts", str(demo / "cutouts"), "--filter", "0", "--workers", "2"))
    compose(out, "--augment", "1")
    assert digests(aug) == first and layout.train_jsonl("stage1").read_bytes() == jsonl
    R.augment(augment_args(out, "--cutouts", str(demo / "cutouts"), "--filter", "0", "--seed", "5"))
    assert digests(aug) != first

    # no cut-outs: no insertion; multipliers are per original; earlier copies are replaced, not added to
    report = R.augment(augment_args(out, "--multipliers", "高风险=2,非楼道=0", "--filter", "0",
                                    "--hazard-hues", "0,223.3"))
    assert report["counts"]["inserted"] == dict.fromkeys(LABELS, 0)
    assert report["counts"]["copies"] == {**dict.fromkeys(LABELS, 0), HIGH_RISK: 2 * n_high}
    assert len(list(aug.iterdir())) == 2 * n_high and report["hazard_hues_deg"] == [0.0, 223.3]


# --------------------------------------------------------------------------- the filter in the step
BLIND = np.array([0.05, 0.1, 0.1, 0.7, 0.05])  # an image-blind model that leans on 无风险


def blind_model(paths: list[str]) -> np.ndarray:
    """The same vector for every image, except a black one, which is 'not a corridor'."""
    out = []
    for p in paths:
        dark = np.asarray(Image.open(p).convert("L")).mean() < 10
        out.append([0.01, 0.01, 0.01, 0.01, 0.96] if dark else BLIND)
    return np.array(out)


def test_filter_in_the_pipeline_drops_corrupted_copies(demo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    layout = prepared(demo, out)
    corrupted: list[str] = []
    real_run_plan = R.run_plan

    def broken_run_plan(jobs, out_dir, **kw):  # a transform gone wrong: two 高风险 copies come out black
        records = real_run_plan(jobs, out_dir, **kw)
        plain = next(r for r, j in zip(records, jobs) if j.label == HIGH_RISK and "insert" not in j.transforms)
        ins = next(r for r, j in zip(records, jobs) if "insert" in j.transforms)
        for r in (plain, ins):
            Image.new("RGB", (168, 168)).save(r.path, format="JPEG")
            corrupted.append(r.name)
        return records

    monkeypatch.setattr(R, "run_plan", broken_run_plan)
    report = R.augment(augment_args(out, "--cutouts", str(demo / "cutouts")), vectors_fn=blind_model)
    compose(out, "--augment", "1")
    assert report["filter"]["applied"] and report["counts"]["dropped"] == {**dict.fromkeys(LABELS, 0), HIGH_RISK: 2}
    assert report["filter"]["model"] == "given scorer"
    assert sorted(p.name for p in layout.augmented_dropped.iterdir()) == sorted(corrupted)
    assert not set(corrupted) & {p.name for p in layout.augmented_images.iterdir()}
    for path in (layout.train_jsonl("stage1"), layout.train_jsonl("stage2")):
        assert not any(Path(p).name in corrupted for p in images_of(path))
    index = read_index(layout.augmented_index)
    assert {r["image"] for r in index if r["kept"] == "0"} == set(corrupted)
    # clean copies all kept, insertion copies included, though this model never prefers 高风险 (prior correction)
    kept_inserted = sum(r["kept"] == "1" and "insert" in r["transforms"] for r in index)
    assert kept_inserted == report["counts"]["inserted"][HIGH_RISK] - 1
    assert report["filter"]["prior"][HIGH_RISK] == pytest.approx(0.05, abs=1e-3)


def test_filter_with_tools_score_on_a_tiny_model(demo, tmp_path, monkeypatch):
    """The real scorer (tools.model.infer.load/score_rows) behind the filter, on a random tiny Qwen2.5-VL."""
    model_dir = build_tiny_model(tmp_path / "model", SPECS["stage2"], seed=0)
    out = tmp_path / "out"
    prepared(demo, out)
    loaded = []
    real = F.model_vectors_fn

    def keep(*a, **kw):
        loaded.append(real(*a, **kw))
        return loaded[-1]

    monkeypatch.setattr(F, "model_vectors_fn", keep)
    report = R.augment(augment_args(out, "--cutouts", str(demo / "cutouts"), "--multipliers",
                                    "高风险=1,非楼道=1", "--insert", "2", "--filter", "1", "--model-stage1",
                                    str(model_dir), "--recipe", "demo", "--torch-dtype", "float32"))
    assert len(loaded) == 1 and report["filter"]["applied"] and "base model" in report["filter"]["model"]
    assert sum(report["filter"]["prior"].values()) == pytest.approx(1, abs=1e-3)
    assert sum(report["counts"]["kept"].values()) + sum(report["counts"]["dropped"].values()) == \
        sum(report["counts"]["copies"].values())
    # the same image under another name scores the same, so an unchanged copy is always kept at ratio 1
    src = next(p for p in (demo / "train").iterdir())
    twin = tmp_path / "twin.jpg"
    twin.write_bytes(src.read_bytes())
    p = loaded[0]([str(src), str(twin)])
    assert p.shape == (2, 5) and p.sum(1) == pytest.approx([1, 1]) and p[0] == pytest.approx(p[1], abs=1e-5)
    s = Sample(src.name, src, "无风险", "t")
    kept, _, _ = F.filter_records([Sample("twin.jpg", twin, "无风险", "x")], [s], loaded[0], ratio=0.999)
    assert len(kept) == 1


def test_a_model_that_cannot_load_skips_auto_but_fails_1(demo, tmp_path, capsys):
    out = tmp_path / "out"
    prepared(demo, out)
    args = ("--multipliers", "高风险=1,非楼道=0", "--model-stage1", str(tmp_path / "no-model"), "--recipe", "demo")
    report = R.augment(augment_args(out, *args, "--filter", "auto"))
    assert report["filter"]["applied"] is False and report["filter"]["model"].startswith("skipped: could not load")
    assert "warning: consistency filter skipped" in capsys.readouterr().err
    with pytest.raises(Exception):
        R.augment(augment_args(out, *args, "--filter", "1"))


# --------------------------------------------------------------------------- the fold sets
def test_fold_training_sets_get_no_copy_of_their_held_out_images(demo, tmp_path):
    data = with_one_more(demo, tmp_path / "data", "非楼道")  # 3 非楼道 images: 1 validates, 2 make 2 folds possible
    out = tmp_path / "out"
    layout = prepared(data, out, "--val-ratio", "0.01", "--folds", "2")
    R.augment(augment_args(out, "--cutouts", str(data / "cutouts"), "--filter", "0"))
    compose(out, "--augment", "1")
    heldout_rows = [layout.heldout_jsonl(i).read_bytes() for i in range(2)]
    index = read_index(layout.augmented_index)
    source = {str((layout.augmented_images / r["image"]).resolve()): r for r in index}  # copy path -> its index row
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    banned_inserts = 0
    for i in range(2):
        held = {name for name, _ in list_pairs(layout.fold_list(i))}
        allowed = {p for p, r in source.items() if r["source"] not in held}
        banned = set(source) - allowed
        assert banned and allowed  # not vacuous: each fold has copies of its held-out images
        banned_inserts += sum("insert" in source[p]["transforms"] for p in banned)
        for stage in ("stage1", "stage2"):
            rows = images_of(layout.train_jsonl(stage, i))
            assert not set(rows) & banned  # no copy of a held-out image ...
            assert not {Path(p).name for p in rows if p not in source} & held  # ... nor the image itself
            assert {p for p in rows if p in source} <= allowed
        stage1 = images_of(layout.train_jsonl("stage1", i))
        assert {p for p in stage1 if p in source} == allowed  # stage 1 takes every copy it may have
        high2 = [r["images"][0] for r in read_jsonl(layout.train_jsonl("stage2", i))
                 if r["messages"][1]["content"] == HIGH_RISK]
        assert set(high2) & allowed  # the specialist's 高风险 block takes copies in place of repeats
        assert layout.heldout_jsonl(i).read_bytes() == heldout_rows[i]  # held-out rows: no copy
        assert not set(images_of(layout.heldout_jsonl(i))) & set(source)
        assert sum(manifest["counts"]["folds"][i]["stage1_rows"].values()) == len(stage1)
    assert banned_inserts  # insertion copies (a 无风险/低风险 source made 高风险) among the banned ones


# --------------------------------------------------------------------------- CLI
def test_cli(demo, tmp_path, capsys):
    out = tmp_path / "out"
    layout = prepared(demo, out)
    rc = R.main(["--output-dir", str(out), "--cutouts", str(demo / "cutouts"), "--multipliers", "高风险=2,非楼道=1",
                 "--insert", "1", "--max-pixels", str(DEMO_PIXELS), "--workers", "1", "--filter", "0", "--no-progress"])
    assert rc == 0
    fit = read_list(layout.train_split, demo / "train", labelled=True, check_images=False)
    n = Counter(s.label for s in fit)
    got = read_list(layout.augmented_list, layout.augmented_images, labelled=True, progress=False)
    labels = [s.label for s in got]
    assert labels.count(HIGH_RISK) == 2 * n[HIGH_RISK] + 1 and labels.count("非楼道") == n["非楼道"]
    assert len(got) == 2 * n[HIGH_RISK] + 1 + n["非楼道"]
    help_text = subprocess.run([sys.executable, "-m", "tools.augment.run", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert "--cutouts" in help_text and "--multipliers" in help_text and "--hazard-hues" in help_text
    with pytest.raises(SystemExit):
        R.main(["--output-dir", str(out), "--multipliers", "危险=1"])
    with pytest.raises(SystemExit):
        R.main(["--output-dir", str(out), "--hazard-hues", "red"])
    capsys.readouterr()
    assert R.main(["--output-dir", str(tmp_path / "none"), "--no-progress"]) == 1  # no split yet
    assert "run tools.data.prepare" in capsys.readouterr().err
    assert R.main(["--output-dir", str(out), "--cutouts", str(tmp_path / "nope"), "--no-progress"]) == 1
    assert "cut-out folder not found" in capsys.readouterr().err
