"""The augmentation step of data-pre.sh (tools.augment_data): copies only of the training split and only in
the training JSONLs, the knob, the consistency filter wired to a scorer (fakes, and tools.score on a tiny
Qwen2.5-VL), the choice of the filter's model, and the ablation table."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import augment as A
from tools import augment_data as AD
from tools import make_demo
from tools.dataset import Sample, read_list
from tools.fileio import read_jsonl, write_json
from tools.prepare_data import augmented_dir, build_parser, prepare
from tools.task import HIGH_RISK, LABEL_TO_INDEX, LABELS, Layout

ROOT = Path(__file__).resolve().parents[1]
DEMO_PIXELS = 28224  # recipes/demo.env


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A small demo dataset in the official layout, with its cut-out folder (DATA_DIR/cutouts)."""
    return make_demo.make_dataset(tmp_path_factory.mktemp("demo"), seed=0, n_train=60, n_test=10, workers=1)


def prepared(data: Path, out: Path) -> Layout:
    prepare(build_parser().parse_args(["--data-dir", str(data), "--output-dir", str(out), "--workers", "1"]))
    return Layout(out)


def augment_args(out: Path, *extra: str):
    return AD.build_parser().parse_args(["--output-dir", str(out), "--max-pixels", str(DEMO_PIXELS), "--workers", "1",
                                         "--no-progress", *extra])


def images_of(path: Path) -> list[str]:
    return [r["images"][0] for r in read_jsonl(path)]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_copies_come_from_the_training_split_and_go_only_to_training_rows(demo, tmp_path):
    layout = prepared(demo, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (layout.val_jsonl("stage1"), layout.val_jsonl("stage2"),
                                                layout.test_jsonl, layout.val_list)}
    report = AD.augment(augment_args(tmp_path / "out", "--cutouts", str(demo / "cutouts"), "--filter", "0"))
    aug = augmented_dir(layout)
    index = AD.read_index(aug / "index.tsv")
    copies = {str((aug / "images" / r["image"]).resolve()) for r in index}
    assert len(index) == sum(report["counts"]["copies"].values()) > 0

    # validation and test rows are untouched; no copy is in them, and no validation image is a source
    for p in (layout.val_jsonl("stage1"), layout.val_jsonl("stage2"), layout.test_jsonl, layout.val_list):
        assert p.read_bytes() == before[p.name]
    val_names = {line.split("\t")[0] for line in layout.val_list.read_text(encoding="utf-8").splitlines()}
    for path in (layout.val_jsonl("stage1"), layout.val_jsonl("stage2"), layout.test_jsonl):
        assert not any(str(aug) in p for p in images_of(path))
    sources = {r["source"] for r in index}
    fit = read_list(layout.data_dir / "train_split.txt", demo / "train", labelled=True, check_images=False)
    assert sources <= {s.name for s in fit} and sources.isdisjoint(val_names)
    assert not {Path(n).stem for n in val_names} & {r["image"].rsplit("_aug", 1)[0] for r in index}

    # stage 1 gets every copy once; stage 2's 高风险 block takes copies instead of repeats
    stage1, stage2 = images_of(layout.train_jsonl("stage1")), images_of(layout.train_jsonl("stage2"))
    assert copies == {p for p in stage1 if str(aug) in p}
    high1 = Counter(r["images"][0] for r in read_jsonl(layout.train_jsonl("stage1"))
                    if r["messages"][1]["content"] == HIGH_RISK)
    assert set(high1.values()) == {1}  # 高风险 is over its 10 % share with the copies: no plain repeat
    high2 = [r["images"][0] for r in read_jsonl(layout.train_jsonl("stage2")) if r["messages"][1]["content"] == HIGH_RISK]
    n_high = sum(s.label == HIGH_RISK for s in fit)
    assert len(high2) == 3 * n_high and len(set(high2)) == len(high2) and set(high2) & copies
    assert all(p in copies or Path(p).parent == demo / "train" for p in stage2)

    # labels: an insertion copy is 高风险 from a 无风险/低风险 source; any other keeps its source's label
    inserted = [r for r in index if "insert" in r["transforms"]]
    assert len(inserted) == 2 * n_high
    assert all(r["label"] == HIGH_RISK and r["source_label"] in A.INSERT_SOURCES for r in inserted)
    assert all(r["label"] == r["source_label"] for r in index if r not in inserted)
    rows = {r["images"][0]: r["messages"][1]["content"] for r in read_jsonl(layout.train_jsonl("stage1"))}
    assert all(rows[str((aug / "images" / r["image"]).resolve())] == r["label"] for r in index)

    # at the model's size; listed; counted in the manifest; a contact sheet
    for p in list(copies)[:20]:
        with Image.open(p) as im:
            assert im.width % 28 == 0 and im.height % 28 == 0 and im.width * im.height <= DEMO_PIXELS
    listed = read_list(aug / A.LIST_NAME, aug / "images", labelled=True, progress=False)
    assert {str(s.path) for s in listed} == copies
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    assert manifest["augmentation"]["counts"]["kept"] == report["counts"]["kept"]
    assert sum(manifest["counts"]["stage1_rows"].values()) == len(stage1)
    assert report["filter"]["applied"] is False and report["max_pixels"] == DEMO_PIXELS
    with Image.open(aug / "contact_sheet.png") as im:
        assert im.format == "PNG" and im.height > 5 * 160

    # the same seed gives the same bytes and the same rows
    first, jsonl = digests(aug / "images"), layout.train_jsonl("stage1").read_bytes()
    AD.augment(augment_args(tmp_path / "out", "--cutouts", str(demo / "cutouts"), "--filter", "0", "--workers", "2"))
    assert digests(aug / "images") == first and layout.train_jsonl("stage1").read_bytes() == jsonl
    AD.augment(augment_args(tmp_path / "out", "--cutouts", str(demo / "cutouts"), "--filter", "0", "--seed", "5"))
    assert digests(aug / "images") != first

    # no cut-outs: no insertion; multipliers are per original
    report = AD.augment(augment_args(tmp_path / "out", "--multipliers", "高风险=2,非楼道=0", "--filter", "0"))
    assert report["counts"]["inserted"] == dict.fromkeys(LABELS, 0)
    assert report["counts"]["copies"] == {**dict.fromkeys(LABELS, 0), HIGH_RISK: 2 * n_high}


def run_script(env: dict, *args: str) -> str:
    proc = subprocess.run(["bash", str(ROOT / "data-pre.sh"), *args], env={**os.environ, "VENV": sys.prefix, **env},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_data_pre_knob(demo, tmp_path):
    out = tmp_path / "out"
    layout = Layout(out)
    env = {"DATA_DIR": str(demo), "OUTPUT_DIR": str(out), "MODEL_STAGE1": "no/such-model"}
    log = run_script({**env, "AUGMENT": "0"})
    assert "augment the training split" not in log and not augmented_dir(layout).exists()
    plain = {stage: layout.train_jsonl(stage).read_bytes() for stage in ("stage1", "stage2")}
    assert all(Path(p).parent == demo / "train" for p in images_of(layout.train_jsonl("stage1")))

    # on by default; real recipe without a GPU: the filter is skipped (a 7B on CPU), cut-outs from DATA_DIR
    log = run_script(env)
    assert "augment the training split done" in log
    report = json.loads((augmented_dir(layout) / "report.json").read_text(encoding="utf-8"))
    assert report["max_pixels"] == 1003520 and report["cutouts"] == str((demo / "cutouts").resolve())
    assert sum(report["counts"]["inserted"].values()) > 0
    if not AD.cuda_available():
        assert report["filter"]["applied"] is False and report["filter"]["model"].startswith("skipped: no GPU")
    assert sum(str(augmented_dir(layout)) in p for p in images_of(layout.train_jsonl("stage1"))) > 0

    # off again: the earlier copies are gone and the rows are as before
    run_script({**env, "AUGMENT": "0"})
    assert not augmented_dir(layout).exists()
    assert {stage: layout.train_jsonl(stage).read_bytes() for stage in plain} == plain


# --------------------------------------------------------------------------- the filter
BLIND = np.array([0.05, 0.1, 0.1, 0.7, 0.05])  # an image-blind model that leans on 无风险


def blind_model(paths: list[str]) -> np.ndarray:
    """The same vector for every image, except a black one, which is 'not a corridor'."""
    out = []
    for p in paths:
        dark = np.asarray(Image.open(p).convert("L")).mean() < 10
        out.append([0.01, 0.01, 0.01, 0.01, 0.96] if dark else BLIND)
    return np.array(out)


def test_filter_in_the_pipeline_drops_corrupted_copies(demo, tmp_path, monkeypatch):
    layout = prepared(demo, tmp_path / "out")
    corrupted: list[str] = []
    real_run_plan = A.run_plan

    def broken_run_plan(jobs, out_dir, **kw):  # a transform gone wrong: two 高风险 copies come out black
        records = real_run_plan(jobs, out_dir, **kw)
        plain = next(r for r, j in zip(records, jobs) if j.label == HIGH_RISK and "insert" not in j.transforms)
        ins = next(r for r, j in zip(records, jobs) if "insert" in j.transforms)
        for r in (plain, ins):
            Image.new("RGB", (168, 168)).save(r.path, format="JPEG")
            corrupted.append(r.name)
        return records

    monkeypatch.setattr(AD.A, "run_plan", broken_run_plan)
    report = AD.augment(augment_args(tmp_path / "out", "--cutouts", str(demo / "cutouts")), vectors_fn=blind_model)
    aug = augmented_dir(layout)
    assert report["filter"]["applied"] and report["counts"]["dropped"] == {**dict.fromkeys(LABELS, 0), HIGH_RISK: 2}
    assert sorted(p.name for p in (aug / "dropped").iterdir()) == sorted(corrupted)
    assert not set(corrupted) & {p.name for p in (aug / "images").iterdir()}
    for path in (layout.train_jsonl("stage1"), layout.train_jsonl("stage2")):
        assert not any(Path(p).name in corrupted for p in images_of(path))
    index = AD.read_index(aug / "index.tsv")
    assert {r["image"] for r in index if r["kept"] == "0"} == set(corrupted)
    # clean copies all kept, insertion copies included, though this model never prefers 高风险 (prior correction)
    assert sum(r["kept"] == "1" and "insert" in r["transforms"] for r in index) == report["counts"]["inserted"][HIGH_RISK] - 1
    assert report["filter"]["prior"][HIGH_RISK] == pytest.approx(0.05, abs=1e-3)


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

    kept, dropped, prior = AD.filter_records(recs, srcs, model, 0.5, prior_images=list(orig.values()))
    assert [r.name for r in kept] == ["a_aug1.jpg", "a_aug3.jpg"] and dropped[HIGH_RISK] == 1 and dropped["无风险"] == 1
    assert prior == pytest.approx(BLIND) and calls == [4 + 5]  # every distinct image scored once
    # the raw rule would drop the blind model's insertion copy: p(高风险) 0.05 < 0.5 × p(无风险) 0.7
    raw = A.consistency_filter(recs, srcs, lambda ps, ls: [vec[p][LABEL_TO_INDEX[lab]] for p, lab in zip(ps, ls)])
    assert "a_aug3.jpg" not in [r.name for r in raw[0]]


def test_the_filter_model_choice(tmp_path, monkeypatch):
    layout = Layout(tmp_path / "out")
    monkeypatch.setattr(AD, "cuda_available", lambda: False)
    argv, what = AD.choose_filter_model("auto", layout, "/models/base", "demo", "float32", 28224)
    assert argv == ["--model", "/models/base", "--template", "qwen2_5_vl", "--torch_dtype", "float32",
                    "--max_pixels", "28224"] and "base model" in what
    assert AD.choose_filter_model("0", layout, "/models/base", "demo", None, 28224)[0] is None
    argv, what = AD.choose_filter_model("auto", layout, "Qwen/Qwen2.5-VL-7B-Instruct", "real", "bfloat16", 1003520)
    assert argv is None and what.startswith("skipped: no GPU")
    assert AD.choose_filter_model("1", layout, "Qwen/Qwen2.5-VL-7B-Instruct", "real", "bfloat16", 1003520)[0]
    monkeypatch.setattr(AD, "cuda_available", lambda: True)
    assert AD.choose_filter_model("auto", layout, "Qwen/Qwen2.5-VL-7B-Instruct", "real", None, 1003520)[0]

    ckpt = layout.run_dir("stage1") / "checkpoint-7"  # a train.sh run before: its checkpoint is preferred
    ckpt.mkdir(parents=True)
    write_json(ckpt / "args.json", {"model": "/models/base"})
    layout.checkpoint_pointer("stage1").write_text(f"{ckpt}\n", encoding="utf-8")
    argv, what = AD.choose_filter_model("auto", layout, "/models/base", "demo", "float32", 28224)
    assert argv == ["--adapters", str(ckpt), "--max_pixels", "28224"] and "checkpoint" in what
    argv, what = AD.choose_filter_model("auto", layout, "/models/other", "demo", "float32", 28224)
    assert argv[:2] == ["--model", "/models/other"] and "not /models/other" in what  # trained from another model


def test_filter_with_tools_score_on_a_tiny_model(demo, tmp_path, monkeypatch):
    """The real scorer (tools.score.load/score_rows) behind the filter, on a random tiny Qwen2.5-VL."""
    model_dir = make_demo.build_tiny_model(tmp_path / "model", make_demo.SPECS["stage2"], seed=0)
    layout = prepared(demo, tmp_path / "out")
    loaded = []
    real = AD.model_vectors_fn

    def keep(*a, **kw):
        loaded.append(real(*a, **kw))
        return loaded[-1]

    monkeypatch.setattr(AD, "model_vectors_fn", keep)
    report = AD.augment(augment_args(tmp_path / "out", "--cutouts", str(demo / "cutouts"), "--multipliers",
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
    kept, _, _ = AD.filter_records([Sample("twin.jpg", twin, "无风险", "x")], [s], loaded[0], ratio=0.999)
    assert len(kept) == 1


# --------------------------------------------------------------------------- ablation table
def test_ablation_table_scores(tmp_path):
    from tools.augment_ablation import main, run_scores
    from tools.metrics import score
    from tools.predict import write_probabilities
    from tools.score import write_probs

    rng = np.random.default_rng(0)
    labels = [LABELS[i % 5] for i in range(20)]
    (tmp_path / "B").mkdir()
    (tmp_path / "B.txt").write_text("".join(f"t{i}.jpg\t{lab}\n" for i, lab in enumerate(labels)), encoding="utf-8")
    names = [f"t{i}.jpg" for i in range(20)]
    gold = [LABEL_TO_INDEX[lab] for lab in labels]
    for run, aug in (("a", 0), ("b", 1)):
        layout = Layout(tmp_path / run)
        p1, p2 = rng.dirichlet(np.ones(5), 20), rng.dirichlet(np.ones(5), 20)
        write_json(layout.manifest, {"test_list": str(tmp_path / "B.txt"), "test_images": str(tmp_path / "B"),
                                     "counts": {"stage1_rows": dict.fromkeys(LABELS, 10 + aug)},
                                     **({"augmentation": {"counts": {"kept": dict.fromkeys(LABELS, 3)}}} if aug else {})})
        write_probs(layout.run_dir("stage1") / "test_probs.csv", names, p1)
        if aug:  # both stages and fusion
            write_probs(layout.run_dir("stage2") / "test_probs.csv", names, p2)
            write_probabilities(layout.probabilities, names, p1, p2, p2, [LABELS[i] for i in p2.argmax(1)])
        r = run_scores(layout.root)
        assert r["stage1"].weighted_f1 == pytest.approx(score(gold, p1.argmax(1)).weighted_f1)
        assert r["stage1_rows"] == 50 + 5 * aug and r["copies"] == 15 * aug
        if aug:
            assert r["fused"].f1[0] == pytest.approx(score(gold, p2.argmax(1)).f1[0])
        else:
            assert r["fused"] is None
    assert main([f"off={tmp_path / 'a'}", f"on={tmp_path / 'b'}"]) == 0


def test_fold_training_sets_get_no_copy_of_their_held_out_images(demo, tmp_path):
    out = tmp_path / "out"  # no validation split: the demo's 2 非楼道 images then make 2 folds possible
    prepare(build_parser().parse_args(["--data-dir", str(demo), "--output-dir", str(out), "--workers", "1",
                                       "--val-ratio", "0", "--folds", "2"]))
    layout = Layout(out)
    heldout_rows = [layout.fold_heldout_jsonl(i).read_bytes() for i in range(2)]
    AD.augment(augment_args(out, "--cutouts", str(demo / "cutouts"), "--filter", "0"))
    aug = augmented_dir(layout)
    index = AD.read_index(aug / "index.tsv")
    source = {str((aug / "images" / r["image"]).resolve()): r for r in index}  # copy path -> its index row
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    for i in range(2):
        held = {line.split("\t")[0] for line in layout.fold_heldout_list(i).read_text(encoding="utf-8").splitlines()}
        allowed = {p for p, r in source.items() if r["source"] not in held}
        banned = set(source) - allowed
        # not vacuous: each fold has copies of its held-out images, insertion copies among them
        assert banned and allowed and any("insert" in source[p]["transforms"] for p in banned)
        for stage in ("stage1", "stage2"):
            rows = images_of(layout.fold_train_jsonl(i, stage))
            assert not set(rows) & banned  # no copy of a held-out image ...
            assert not {Path(p).name for p in rows if p not in source} & held  # ... nor the image itself
            assert {p for p in rows if p in source} <= allowed
        stage1 = images_of(layout.fold_train_jsonl(i, "stage1"))
        assert {p for p in stage1 if p in source} == allowed  # stage 1 takes every copy it may have
        high2 = [r["images"][0] for r in read_jsonl(layout.fold_train_jsonl(i, "stage2"))
                 if r["messages"][1]["content"] == HIGH_RISK]
        assert set(high2) & allowed  # the specialist's 高风险 block takes copies in place of repeats
        assert layout.fold_heldout_jsonl(i).read_bytes() == heldout_rows[i]  # held-out rows untouched
        assert sum(manifest["counts"]["folds"][i]["stage1_rows"].values()) == len(stage1)
