"""tools.decide.oof: pooling each fold's held-out predictions with the validation split's into what the fusion search
reads (FOLDS > 1), and the checks of the split's folds that train.sh and test.sh run first."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import list_pairs, make_official, names_in, prepare_and_compose
from tools.decide import oof
from tools.decide.search import load_validation
from tools.fileio import DataError
from tools.probs import read_probs, write_probs
from tools.task import LABELS, STAGES, Layout


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
    with pytest.raises(DataError, match="f0.csv: 2 names but 1 probability rows"):
        oof.union([(Path("f0.csv"), ["x.jpg", "y.jpg"], np.zeros((1, 5)))])
    oof.check_covers(Path("f0.csv"), ["y.jpg", "x.jpg"], ["x.jpg", "y.jpg"], Path("heldout.txt"))
    with pytest.raises(DataError, match=r"f0.csv:3: q.jpg is not in heldout.txt"):
        oof.check_covers(Path("f0.csv"), ["x.jpg", "q.jpg"], ["x.jpg", "y.jpg"], Path("heldout.txt"))
    with pytest.raises(DataError, match=r"f0.csv: no row for 1 image\(s\) of heldout.txt, e.g. y.jpg"):
        oof.check_covers(Path("f0.csv"), ["x.jpg"], ["x.jpg", "y.jpg"], Path("heldout.txt"))


def fake_probs(names: list[str], salt: int) -> np.ndarray:
    rng = np.random.default_rng([salt, len(names)])
    p = rng.random((len(names), len(LABELS))) + 0.01
    return p / p.sum(1, keepdims=True)


@pytest.fixture
def folded(tmp_path) -> Layout:
    """data-pre.sh with FOLDS=2 on 6 images per label (val 0.25: 2 per label held out, 2 per label per fold)."""
    out = tmp_path / "out"
    prepare_and_compose(make_official(tmp_path / "data", n_per_label=6), out, "--val-ratio", "0.25", "--folds", "2")
    return Layout(out)


def test_pool_writes_what_fusion_search_reads(folded, capsys):
    layout = folded
    out = layout.root
    val_names = [name for name, _ in list_pairs(layout.val_list)]
    expected = {}
    for s, stage in enumerate(STAGES):
        for i in range(2):
            held = names_in(layout.heldout_jsonl(i))[::-1]  # any row order within a fold
            write_probs(layout.probs(stage, "heldout", i), held, fake_probs(held, 10 * s + i))
            expected.update({(stage, n): p for n, p in zip(held, fake_probs(held, 10 * s + i))})
        write_probs(layout.probs(stage, "val"), val_names, fake_probs(val_names, 10 * s + 9))
        expected.update({(stage, n): p for n, p in zip(val_names, fake_probs(val_names, 10 * s + 9))})

    assert oof.main(["--output-dir", str(out)]) == 0
    assert "pooled 20 out-of-fold and 10 validation predictions" in capsys.readouterr().out
    fit = list_pairs(layout.train_split)
    gold = dict(list_pairs(layout.oof_gold))
    val_gold = dict(list_pairs(layout.val_list))
    assert gold == {**dict(fit), **val_gold} and len(gold) == 30  # every training-split image once, and validation
    held_order = [name for i in range(2) for name, _ in list_pairs(layout.fold_list(i))]
    assert [name for name, _ in list_pairs(layout.oof_gold)] == held_order + val_names  # fold 0, fold 1, validation
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
    held = names_in(layout.heldout_jsonl(1))
    write_probs(layout.probs("stage2", "heldout", 1), held[1:], fake_probs(held[1:], 0))
    assert oof.main(["--output-dir", str(out)]) == 1
    assert f"{layout.probs('stage2', 'heldout', 1)}: no row for 1 image(s)" in capsys.readouterr().err
    assert oof.main(["--output-dir", str(out), "--folds", "3", "--check"]) == 1
    assert "FOLDS=3, but data-pre.sh split the training data into 2 fold(s)" in capsys.readouterr().err
    assert oof.main(["--output-dir", str(out), "--folds", "2", "--check"]) == 0


def test_check_split_needs_every_fold_file(folded, capsys):
    layout = folded
    assert oof.check_split(layout) == 2 and oof.check_split(layout, 2) == 2
    layout.train_jsonl("stage2", 1).unlink()
    with pytest.raises(DataError, match=r"folds/1/stage2_train.jsonl: not found: run data-pre.sh again"):
        oof.check_split(layout)
    assert oof.main(["--output-dir", str(layout.root), "--check"]) == 1
    assert "run data-pre.sh again" in capsys.readouterr().err


def test_without_folds_there_is_nothing_to_pool(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="manifest.json: not found: run data-pre.sh first"):
        oof.split_folds(Layout(out))
    prepare_and_compose(make_official(tmp_path / "data"), out)
    assert oof.check_split(Layout(out)) == 1  # FOLDS=1: nothing more to check
    assert oof.main(["--output-dir", str(out), "--check"]) == 0
    assert oof.main(["--output-dir", str(out)]) == 1
    assert "the split has no folds (FOLDS=1): nothing to pool" in capsys.readouterr().err
