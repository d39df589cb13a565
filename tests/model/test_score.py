"""tools.model.score, the scoring CLI: what its --output-dir form scores (jobs_for) and what it refuses."""
from __future__ import annotations

import json

import pytest

from tools.model import score as S
from tools.model.checkpoint import write_pointer
from tools.task import STAGES, Layout


def pointed_runs(layout: Layout, folds: int) -> dict:
    """A checkpoint-1 and its pointer for each stage of the final run and of each fold."""
    ckpts = {}
    for run in ["final", *range(folds if folds > 1 else 0)]:
        for stage in STAGES:
            (layout.run_dir(stage, run) / "checkpoint-1").mkdir(parents=True)
            ckpts[(run, stage)] = write_pointer(layout.run_dir(stage, run))
    return ckpts


def test_jobs_for_final_and_folds(tmp_path):
    layout = Layout(tmp_path / "out")
    ckpts = pointed_runs(layout, 2)
    final = [(ckpts[("final", s)], [(layout.test_jsonl, layout.probs(s, "test")),
                                     (layout.val_jsonl(s), layout.probs(s, "val"))]) for s in STAGES]
    folds = [(ckpts[(i, s)], [(layout.heldout_jsonl(i), layout.probs(s, "heldout", i))])
             for i in range(2) for s in STAGES]
    assert S.jobs_for(layout, ["final"], 2) == final
    assert S.jobs_for(layout, ["final", "folds"], 2) == final + folds
    assert S.jobs_for(layout, ["folds"], 2) == folds
    assert S.jobs_for(layout, ["final", "folds"], 1) == final  # no folds: nothing more
    assert layout.probs("stage2", "heldout", 1) == layout.root / "folds" / "1" / "stage2" / "heldout_probs.csv"
    assert ckpts[(1, "stage2")] == (layout.root / "folds" / "1" / "stage2" / "checkpoint-1").resolve()
    with pytest.raises(FileNotFoundError, match="final_checkpoint.txt not found"):
        S.jobs_for(layout, ["folds"], 3)  # fold 2 was never trained


def test_cli_refusals(tmp_path, capsys):
    out = tmp_path / "out"
    assert S.main(["--output-dir", str(out)]) == 1
    assert "manifest.json: not found: run data-pre.sh first" in capsys.readouterr().err
    layout = Layout(out)
    layout.manifest.parent.mkdir(parents=True)
    layout.manifest.write_text(json.dumps({"folds": 2}), encoding="utf-8")
    assert S.main(["--output-dir", str(out), "--runs", "final", "folds"]) == 1  # train.sh has not run
    assert "final_checkpoint.txt not found: run train.sh first" in capsys.readouterr().err
    for argv in (["--output-dir", str(out), "--checkpoint", "x"], ["--checkpoint", "x", "--dataset", "d.jsonl"], [],
                 ["--output-dir", str(out), "--runs", "all"]):
        with pytest.raises(SystemExit) as exc:
            S.main(argv)
        assert exc.value.code == 2
