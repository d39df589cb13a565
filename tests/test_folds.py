"""k-fold out-of-fold predictions (FOLDS): the fold partition, the fold training sets, the knob's checks, the
pooling of held-out predictions (tools.oof), and train.sh / test.sh with FOLDS=2 against a fake `swift` and a
fake scorer (no model is trained or loaded)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.test_prepare_data import SHARES, fake_samples, make_official
from tools import oof
from tools.dataset import DataError, Sample, read_list
from tools.fileio import read_jsonl
from tools.fusion_search import load_validation
from tools.prepare_data import (build_parser, check_folds, main as prepare_main, prepare, stage_sets,
                                stratified_folds, train_split_list)
from tools.score import read_probs, write_probs
from tools.task import LABELS, STAGES, Layout

ROOT = Path(__file__).resolve().parents[1]
COMPOSITION = {"stage1_min_share": 0.1, "stage2_high_repeat": 3, "stage2_other_ratio": 2.0}


# --------------------------------------------------------------------------- the partition
def test_fold_partition_is_stratified_and_seeded():
    samples = fake_samples()
    folds = stratified_folds(samples, 3, seed=7)
    assert len(folds) == 3
    names = [s.name for fold in folds for s in fold]
    assert sorted(names) == sorted(s.name for s in samples)  # every image in exactly one fold
    for label, n in SHARES.items():  # per label, fold sizes differ by at most one
        per_fold = [sum(s.label == label for s in fold) for fold in folds]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 1
    order = {s.name: i for i, s in enumerate(samples)}
    assert all([order[s.name] for s in fold] == sorted(order[s.name] for s in fold) for fold in folds)
    assert stratified_folds(samples, 3, seed=7) == folds
    assert [[s.name for s in f] for f in stratified_folds(samples, 3, seed=8)] != [[s.name for s in f] for f in folds]


def test_folds_knob_is_checked():
    samples = fake_samples()  # the rarest label, 非楼道, has 3 images
    check_folds(1, samples)
    check_folds(3, samples)
    with pytest.raises(DataError, match=r"FOLDS=4 \(--folds\): .* only 3 非楼道 image\(s\).* at most 3"):
        check_folds(4, samples)
    with pytest.raises(DataError, match=r"FOLDS \(--folds\) must be at least 1"):
        check_folds(0, samples)


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", ""])
def test_bad_folds_value_is_refused_naming_the_knob(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare_main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--folds", bad])
    assert exc.value.code == 2
    assert f"FOLDS (--folds) must be a whole number >= 1 (1 = no folds), got {bad!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def prepare_args(data: Path, out: Path, *extra: str):
    return build_parser().parse_args(["--data-dir", str(data), "--output-dir", str(out), "--workers", "1",
                                      "--recipe", "demo", "--model-stage1", "/m1", "--model-stage2", "/m2", *extra])


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def official(tmp_path) -> Path:
    return make_official(tmp_path / "data", n_per_label=6)  # val 0.25: 2 per label held out, 4 left to fold


def test_too_many_folds_for_the_rarest_label_writes_nothing(official, tmp_path):
    with pytest.raises(DataError, match=r"FOLDS=5 \(--folds\): the training split \(train_split.txt\) has only 4 "):
        prepare(prepare_args(official, tmp_path / "out", "--val-ratio", "0.25", "--folds", "5"))
    assert not (tmp_path / "out").exists()
    assert prepare_main(["--data-dir", str(official), "--output-dir", str(tmp_path / "out"), "--folds", "5",
                         "--val-ratio", "0.25", "--workers", "1"]) == 1


# --------------------------------------------------------------------------- the fold sets
def names_in(path: Path) -> list[str]:
    return [Path(r["images"][0]).name for r in read_jsonl(path)]


def test_fold_sets_hold_out_their_fold_and_train_on_the_rest(official, tmp_path):
    plain, out = tmp_path / "plain", tmp_path / "out"
    prepare(prepare_args(official, plain, "--val-ratio", "0.25"))
    manifest = prepare(prepare_args(official, out, "--val-ratio", "0.25", "--folds", "2"))
    layout = Layout(out)
    fit = read_list(train_split_list(layout), official / "train", labelled=True, check_images=False)
    val = {line.split("\t")[0] for line in layout.val_list.read_text(encoding="utf-8").splitlines()}

    # the folds partition the training split (not the validation split), stratified
    heldout = [read_list(layout.fold_heldout_list(i), official / "train", labelled=True, check_images=False)
               for i in range(2)]
    assert sorted(s.name for h in heldout for s in h) == sorted(s.name for s in fit)
    assert all(Counter(s.label for s in h) == dict.fromkeys(LABELS, 2) for h in heldout)
    assert manifest["folds"] == 2 and [c["heldout"] for c in manifest["counts"]["folds"]] == [dict.fromkeys(LABELS, 2)] * 2

    for i, held in enumerate(heldout):
        held_names = {s.name for s in held}
        rest = [s for s in fit if s.name not in held_names]
        assert names_in(layout.fold_heldout_jsonl(i)) == [s.name for s in held]
        assert [r["messages"][1]["content"] for r in read_jsonl(layout.fold_heldout_jsonl(i))] == [s.label for s in held]
        # the normal composition rules on the other folds: exactly stage_sets of the rest
        for stage, rows in zip(STAGES, stage_sets(rest, COMPOSITION, 42)):
            got = names_in(layout.fold_train_jsonl(i, stage))
            assert got == [s.name for s in rows]
            assert not set(got) & held_names and not set(got) & val
        assert set(names_in(layout.fold_train_jsonl(i, "stage1"))) == {s.name for s in rest}
        assert manifest["counts"]["folds"][i]["stage1_rows"] == Counter(s.label for s in stage_sets(rest, COMPOSITION, 42)[0])

    # folds change nothing else: the split and the normal sets are byte for byte those of FOLDS=1
    with_folds = files_under(out)
    for name, content in files_under(plain).items():
        if name not in ("data/manifest.json", "pipeline.env"):
            assert with_folds[name] == content, name
    assert ': "${FOLDS:=2}"' in layout.pipeline_env.read_text(encoding="utf-8")

    # FOLDS=1 again: no fold files left behind, and the output is exactly a plain run's
    prepare(prepare_args(official, out, "--val-ratio", "0.25"))
    assert not layout.folds_data_dir.exists()
    assert files_under(out) == files_under(plain)
    assert json.loads(layout.manifest.read_text(encoding="utf-8"))["folds"] == 1


# --------------------------------------------------------------------------- pooling the held-out predictions
def test_union_keeps_order_and_refuses_an_image_twice():
    a = (Path("f0.csv"), ["x.jpg", "y.jpg"], np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.6, 0.1, 0.1, 0.1]]))
    b = (Path("f1.csv"), ["z.jpg"], np.array([[0.0, 0.0, 0.0, 0.0, 1.0]]))
    v = (Path("val.csv"), ["w.jpg"], np.array([[0.2] * 5]))
    names, probs = oof.union([a, b, v])
    assert names == ["x.jpg", "y.jpg", "z.jpg", "w.jpg"]
    np.testing.assert_array_equal(probs, np.vstack([a[2], b[2], v[2]]))
    with pytest.raises(DataError, match=r"f1.csv:3: y.jpg already on f0.csv:3"):
        oof.union([a, (Path("f1.csv"), ["z.jpg", "y.jpg"], np.zeros((2, 5)))])
    with pytest.raises(DataError, match="no predictions"):
        oof.union([])
    oof.check_covers(Path("f0.csv"), ["y.jpg", "x.jpg"], ["x.jpg", "y.jpg"], Path("heldout.txt"))
    with pytest.raises(DataError, match=r"f0.csv:3: q.jpg is not in heldout.txt"):
        oof.check_covers(Path("f0.csv"), ["x.jpg", "q.jpg"], ["x.jpg", "y.jpg"], Path("heldout.txt"))
    with pytest.raises(DataError, match=r"f0.csv: no row for 1 image\(s\) of heldout.txt, e.g. y.jpg"):
        oof.check_covers(Path("f0.csv"), ["x.jpg"], ["x.jpg", "y.jpg"], Path("heldout.txt"))


def fake_probs(names: list[str], salt: int) -> np.ndarray:
    rng = np.random.default_rng([salt, len(names)])
    p = rng.random((len(names), len(LABELS))) + 0.01
    return p / p.sum(1, keepdims=True)


def test_pool_writes_what_fusion_search_reads(official, tmp_path, capsys):
    out = tmp_path / "out"
    prepare(prepare_args(official, out, "--val-ratio", "0.25", "--folds", "2"))
    layout = Layout(out)
    val_names = [line.split("\t")[0] for line in layout.val_list.read_text(encoding="utf-8").splitlines()]
    expected = {}
    for s, stage in enumerate(STAGES):
        for i in range(2):
            held = names_in(layout.fold_heldout_jsonl(i))[::-1]  # any row order within a fold
            write_probs(layout.fold_heldout_probs(i, stage), held, fake_probs(held, 10 * s + i))
            expected.update({(stage, n): p for n, p in zip(held, fake_probs(held, 10 * s + i))})
        write_probs(layout.run_dir(stage) / "val_probs.csv", val_names, fake_probs(val_names, 10 * s + 9))
        expected.update({(stage, n): p for n, p in zip(val_names, fake_probs(val_names, 10 * s + 9))})

    assert oof.main(["--output-dir", str(out)]) == 0
    assert "pooled 20 out-of-fold and 10 validation predictions" in capsys.readouterr().out
    fit = [line.split("\t") for line in train_split_list(layout).read_text(encoding="utf-8").splitlines()]
    gold = dict(tuple(line.split("\t")) for line in layout.oof_gold.read_text(encoding="utf-8").splitlines())
    val_gold = dict(tuple(line.split("\t")) for line in layout.val_list.read_text(encoding="utf-8").splitlines())
    assert gold == {**dict(fit), **val_gold} and len(gold) == 30  # every training-split image once, and validation
    for stage in STAGES:
        names, probs = read_probs(layout.oof_probs(stage))
        assert names[-10:] == val_names and len(set(names)) == 30
        np.testing.assert_allclose(probs, [expected[(stage, n)] for n in names], atol=1e-6)
    names, p1, p2_high, gold_idx = load_validation(layout.oof_probs("stage1"), layout.oof_probs("stage2"),
                                                   layout.oof_gold)
    assert len(names) == 30 and [LABELS[g] for g in gold_idx] == [gold[n] for n in names]

    assert oof.main(["--output-dir", str(out), "--no-val"]) == 0
    assert len(read_probs(layout.oof_probs("stage1"))[0]) == 20 == len(layout.oof_gold.read_text().splitlines())

    # a stale fold file (an image missing) and a knob that disagrees with the split are errors
    held = names_in(layout.fold_heldout_jsonl(1))
    write_probs(layout.fold_heldout_probs(1, "stage2"), held[1:], fake_probs(held[1:], 0))
    assert oof.main(["--output-dir", str(out)]) == 1
    assert f"{layout.fold_heldout_probs(1, 'stage2')}: no row for 1 image(s)" in capsys.readouterr().err
    assert oof.main(["--output-dir", str(out), "--folds", "3", "--check"]) == 1
    assert "FOLDS=3, but data-pre.sh split the training data into 2 fold(s)" in capsys.readouterr().err
    assert oof.main(["--output-dir", str(out), "--folds", "2", "--check"]) == 0


# --------------------------------------------------------------------------- train.sh and test.sh with FOLDS=2
FAKE_SWIFT = """#!/usr/bin/env bash
# Records each call's arguments (one a line, then a blank line) and makes the checkpoint train.sh looks for.
printf '%s\\n' "$@" >> "$SWIFT_CALLS"; echo >> "$SWIFT_CALLS"
while [[ $# -gt 0 ]]; do [[ $1 == --output_dir ]] && mkdir -p "$2/checkpoint-1"; shift; done
"""
# `python -m tools.score` runs FAKE_SCORE instead (no model); every other python call is the real one.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "${1-} ${2-}" == "-m tools.score" ]]; then shift 2; exec "$REAL_PYTHON" "$FAKE_SCORE" "$@"; fi
exec "$REAL_PYTHON" "$@"
"""
FAKE_SCORE = """import json, os, sys
from pathlib import Path
import numpy as np
from tools.fileio import read_jsonl
from tools.score import write_probs
argv = sys.argv[1:]
with open(os.environ["SCORE_CALLS"], "a", encoding="utf-8") as f:
    f.write(json.dumps(argv) + "\\n")
ours = argv[:argv.index("--")]
datasets = [ours[i + 1] for i, a in enumerate(ours) if a == "--dataset"]
outputs = [ours[i + 1] for i, a in enumerate(ours) if a == "--output"]
for dataset, output in zip(datasets, outputs):
    names = [Path(r["images"][0]).name for r in read_jsonl(dataset)]
    p = np.random.default_rng(len(names)).random((len(names), 5)) + 0.01
    write_probs(output, names, p / p.sum(1, keepdims=True))
"""


def run_script(script: str, tmp_path: Path, out: Path, *args: str, rc: int = 0, **env: str) -> str:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("swift", FAKE_SWIFT), ("python", FAKE_PYTHON)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (tmp_path / "fake_score.py").write_text(FAKE_SCORE)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FIRESAFE_", "STAGE", "FOLDS", "RUNS"))}
    full_env.update(PATH=f"{fake}:{os.environ['PATH']}", VENV=str(tmp_path / "novenv"), OUTPUT_DIR=str(out),
                    REAL_PYTHON=sys.executable, FAKE_SCORE=str(tmp_path / "fake_score.py"),
                    SWIFT_CALLS=str(tmp_path / "swift_calls.txt"), SCORE_CALLS=str(tmp_path / "score_calls.jsonl"),
                    **env)
    proc = subprocess.run(["bash", str(ROOT / script), *args], env=full_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def swift_calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "swift_calls.txt"
    calls = [call.split("\n") for call in path.read_text().split("\n\n") if call.strip()] if path.exists() else []
    path.unlink(missing_ok=True)
    return calls


def value(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_train_sh_and_test_sh_with_two_folds(official, tmp_path):
    out = tmp_path / "out"
    prepare(prepare_args(official, out, "--val-ratio", "0.25", "--folds", "2"))
    layout = Layout(out)

    log = run_script("train.sh", tmp_path, out, "--lora_rank", "4")
    calls = swift_calls(tmp_path)
    runs = [(0, "stage1"), (0, "stage2"), (1, "stage1"), (1, "stage2"), ("final", "stage1"), ("final", "stage2")]
    assert len(calls) == len(runs)
    for argv, (fold, stage) in zip(calls, runs):
        final = fold == "final"
        assert argv[:2] == ["sft", "--model"] and value(argv, "--model") == ("/m1" if stage == "stage1" else "/m2")
        assert value(argv, "--dataset") == str(layout.train_jsonl(stage) if final else layout.fold_train_jsonl(fold, stage))
        assert value(argv, "--output_dir") == str(layout.run_dir(stage) if final else layout.fold_run_dir(fold, stage))
        # checkpoints are chosen on the validation split, never on the held-out fold
        assert value(argv, "--val_dataset") == str(layout.val_jsonl(stage))
        assert value(argv, "--tuner_type") == ("lora" if stage == "stage1" else "hr_amplifier")
        assert argv[-2:] == ["--lora_rank", "4"]  # the user's flags reach every run
        run_dir = layout.run_dir(stage) if final else layout.fold_run_dir(fold, stage)
        assert (run_dir / "final_checkpoint.txt").read_text().strip() == str(run_dir / "checkpoint-1")
    assert "stage 1 (/m1), fold 1 of 2 done" in log

    # only some runs: RUNS and STAGES
    run_script("train.sh", tmp_path, out, RUNS="final")
    assert [value(a, "--output_dir") for a in swift_calls(tmp_path)] == [str(layout.run_dir(s)) for s in STAGES]
    run_script("train.sh", tmp_path, out, RUNS="folds", STAGES="stage2")
    assert [value(a, "--output_dir") for a in swift_calls(tmp_path)] == [str(layout.fold_run_dir(i, "stage2"))
                                                                         for i in range(2)]
    # a FOLDS that is not the split's fails before any training
    log = run_script("train.sh", tmp_path, out, rc=1, FOLDS="3")
    assert "FOLDS=3, but data-pre.sh split the training data into 2 fold(s)" in log and swift_calls(tmp_path) == []

    log = run_script("test.sh", tmp_path, out, "--max_batch_size", "2")
    scored = [json.loads(line) for line in (tmp_path / "score_calls.jsonl").read_text().splitlines()]
    assert len(scored) == 2 + 4  # the final models, then each fold's two models
    for argv, (fold, stage) in zip(scored[2:], [(0, "stage1"), (0, "stage2"), (1, "stage1"), (1, "stage2")]):
        assert value(argv, "--checkpoint") == str(layout.fold_run_dir(fold, stage) / "checkpoint-1")
        assert value(argv, "--dataset") == str(layout.fold_heldout_jsonl(fold))
        assert value(argv, "--output") == str(layout.fold_heldout_probs(fold, stage))
        assert argv[argv.index("--"):] == ["--", "--max_pixels", "28224", "--max_batch_size", "2"]  # "$@" passed on
    assert "fusion search on the out-of-fold and validation predictions done" in log
    fusion = json.loads(layout.fusion_params.read_text(encoding="utf-8"))
    assert fusion["n_val"] == 30  # 20 out-of-fold + 10 validation images
    assert len(layout.oof_gold.read_text(encoding="utf-8").splitlines()) == 30
    assert layout.submission.exists()


def test_scripts_without_folds_run_as_before(official, tmp_path):
    out = tmp_path / "out"
    prepare(prepare_args(official, out, "--val-ratio", "0.25"))
    layout = Layout(out)
    run_script("train.sh", tmp_path, out)
    assert [value(a, "--dataset") for a in swift_calls(tmp_path)] == [str(layout.train_jsonl(s)) for s in STAGES]
    log = run_script("test.sh", tmp_path, out)
    assert len((tmp_path / "score_calls.jsonl").read_text().splitlines()) == 2
    assert "fusion search on the validation split done" in log and "out-of-fold" not in log
    assert json.loads(layout.fusion_params.read_text(encoding="utf-8"))["n_val"] == 10
    assert not layout.folds_dir.exists() and not layout.folds_data_dir.exists()


def test_data_pre_passes_folds_and_refuses_a_bad_value(official, tmp_path):
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "FOLDS"}, "VENV": sys.prefix, "DATA_DIR": str(official),
           "OUTPUT_DIR": str(out), "AUGMENT": "0", "VAL_RATIO": "0.25"}
    proc = subprocess.run(["bash", str(ROOT / "data-pre.sh"), "--workers", "1"], env={**env, "FOLDS": "2"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(Layout(out).manifest.read_text(encoding="utf-8"))["folds"] == 2
    assert Layout(out).fold_heldout_list(1).exists()
    for bad, message in (("0", "FOLDS must be a whole number >= 1 (1 = no folds), got '0'"),
                         ("5", "FOLDS=5 (--folds): the training split (train_split.txt) has only 4")):
        proc = subprocess.run(["bash", str(ROOT / "data-pre.sh"), "--workers", "1"], env={**env, "FOLDS": bad},
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and message in proc.stdout + proc.stderr
