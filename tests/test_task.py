"""tools.task: the labels and prompt, the swift rows, and Layout, every path of the pipeline under one output folder
(also from the shell: `python -m tools.task --output-dir D NAME ARGS`)."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tools import task
from tools.task import FINAL, LABELS, PROMPT, STAGES, Layout, main, sft_row


def every_path(layout: Layout) -> dict[str, Path]:
    """Every path Layout gives, each method called with each stage, run, fold and part it takes."""
    out = {}
    for name, attr in inspect.getmembers(Layout):
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            out[name] = getattr(layout, name)
        elif callable(attr):
            params = list(inspect.signature(attr).parameters)[1:]
            parts = ("train", "test") if name == "prepared_images" else ("test", "val", "heldout")
            choices = {"stage": STAGES, "run": (FINAL, 0, 2), "fold": (0, 3), "part": parts,
                       "task": ("causal_lm", "seq_cls")}
            combos = [[]]
            for p in params:
                combos = [c + [v] for c in combos for v in choices[p]]
            for combo in combos:
                out[f"{name}{tuple(combo)}"] = getattr(layout, name)(*combo)
    return out


def test_every_path_is_under_the_output_root(tmp_path):
    layout = Layout(tmp_path / "out" / ".." / "out")
    assert layout.root == (tmp_path / "out").resolve()
    paths = every_path(layout)
    assert len(paths) > 40
    for name, path in paths.items():
        assert isinstance(path, Path) and path.is_absolute(), name
        assert path.is_relative_to(layout.root) and path != layout.root, name
    files = [p for n, p in paths.items() if p.suffix]
    assert len(files) == len(set(files))  # no two things share a file
    assert Layout("rel").root == Path("rel").resolve()


def test_final_run_and_fold_runs(tmp_path):
    layout = Layout(tmp_path)
    root = layout.root
    assert layout.train_jsonl("stage1") == layout.train_jsonl("stage1", FINAL) == root / "data" / "stage1_train.jsonl"
    assert layout.train_jsonl("stage2", 1) == layout.train_jsonl("stage2", "1")
    assert layout.train_jsonl("stage2", 1) == root / "data/folds/1/stage2_train.jsonl"
    assert layout.heldout_jsonl(1) == root / "data/folds/1/heldout.jsonl"
    assert layout.run_dir("stage1") == root / "stage1" and layout.run_dir("stage2", 0) == root / "folds/0/stage2"
    assert layout.checkpoint_pointer("stage1", 0) == root / "folds/0/stage1/final_checkpoint.txt"
    assert layout.probs("stage1", "test") == root / "stage1/test_probs.csv"
    assert layout.probs("stage2", "val", FINAL) == root / "stage2/val_probs.csv"
    assert layout.probs("stage2", "heldout", 1) == root / "folds/1/stage2/heldout_probs.csv"
    assert layout.val_list == root / "data/split/val.txt" and layout.train_split == root / "data/split/train.txt"
    assert layout.test_list == root / "data/split/test.txt" and layout.fold_list(2) == root / "data/split/folds/2.txt"
    # the prepared images (tools.data.prepare): training and validation images in train/, the test list's in test/
    assert layout.prepared_images("train") == root / "data/images/train"
    assert layout.prepared_images("test") == root / "data/images/test"
    with pytest.raises(ValueError, match="part must be train or test, got 'val'"):
        layout.prepared_images("val")
    assert layout.augmented_list.parent == layout.augmented_dir == root / "data/augmented"
    assert layout.oof_probs("stage1") == root / "folds/oof_stage1.csv" and layout.oof_gold.parent == layout.folds_dir
    assert layout.submission == root / "b-submit.txt" and not hasattr(layout, "pipeline_env")  # in the manifest now
    assert layout.lock_file == root / ".lock" and layout.lock_owner == root / ".lock.owner"
    # train.sh trains beside the run folder and swaps the work folder in: never inside it, never another run's
    assert layout.run_work_dir("stage1") == root / "stage1.training"
    assert layout.run_work_dir("stage2", 0) == root / "folds/0/stage2.training"
    assert layout.trained_on("stage1", 0) == root / "folds/0/stage1/trained_on.json"
    assert layout.probs_record("stage1", "test") == root / "stage1/test_probs.json"
    assert layout.probs_partial("stage2", "heldout", 1) == root / "folds/1/stage2/heldout_probs.partial.csv"
    assert task.probs_record_of(layout.probs("stage1", "val")) == layout.probs_record("stage1", "val")
    assert task.probs_partial_of(layout.probs("stage1", "val")) == layout.probs_partial("stage1", "val")
    for stage in STAGES:
        for run in (FINAL, 0, 1):
            work = layout.run_work_dir(stage, run)
            assert work.parent == layout.run_dir(stage, run).parent
            assert not work.is_relative_to(layout.run_dir(stage, run))
    # a fold's run never shares a folder or file with the final run's
    assert not layout.run_dir("stage1", 0).is_relative_to(layout.run_dir("stage1"))
    with pytest.raises(ValueError):
        layout.run_dir("stage1", "folds")  # a run is final or a fold number


def test_probs_rejects_an_unknown_part(tmp_path):
    with pytest.raises(ValueError, match="part must be test, val or heldout, got 'train'"):
        Layout(tmp_path).probs("stage1", "train")


def test_cli_prints_a_path(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "run_dir", "stage1", "0"]) == 0
    assert capsys.readouterr().out == f"{Layout(tmp_path).run_dir('stage1', 0)}\n"
    assert main(["--output-dir", str(tmp_path), "manifest"]) == 0
    assert capsys.readouterr().out == f"{tmp_path.resolve() / 'data' / 'manifest.json'}\n"
    proc = subprocess.run([sys.executable, "-m", "tools.task", "--output-dir", str(tmp_path), "train_jsonl", "stage2",
                           "final"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path.resolve() / "data" / "stage2_train.jsonl")
    proc = subprocess.run([sys.executable, "-m", "tools.task", "lock_file"], cwd=tmp_path, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})  # this checkout's tools
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path.resolve() / "outputs" / ".lock")


@pytest.mark.parametrize("argv, message", [
    (["no_such_path"], "no path named 'no_such_path'"),
    (["_data_run", "final"], "no path named '_data_run'"),
    (["probs", "stage1", "train"], "probs: part must be test, val or heldout"),
    (["run_dir"], "run_dir: "),
    (["manifest", "x"], "manifest takes no arguments"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["--output-dir", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_rows_and_prompt():
    assert all(label in PROMPT for label in LABELS) and PROMPT.count("（") == len(LABELS)
    row = sft_row("x/a.jpg", LABELS[0])
    assert row == {"messages": [{"role": "user", "content": "<image>" + PROMPT},
                                {"role": "assistant", "content": LABELS[0]}],
                   "images": [str(Path("x/a.jpg").resolve())]}
    assert len(sft_row("a.jpg", None)["messages"]) == 1
    assert sum(task.CLASS_WEIGHTS.values()) == task.MAX_SCORE == 6.5
    assert [task.LABEL_TO_INDEX[label] for label in LABELS] == list(range(5)) and task.HIGH_RISK_INDEX == 0
