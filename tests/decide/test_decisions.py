"""Decisions that maximise the expected Σ w·F1 under calibrated probabilities (tools.decide.decisions), and the
fusion search starting from them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tools.decide.decisions import WEIGHTS, expected_weighted_f1, f1_offsets
from tools.decide.search import main, search
from tools.probs import write_probs
from tools.report.metrics import weighted_f1
from tools.task import HIGH_RISK_INDEX, LABELS

SHARES = np.array([0.03, 0.19, 0.14, 0.59, 0.05])  # the official data's class shares, in LABELS order


def calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, 5], gold [n]) of a model that is exactly calibrated: the class shares times a noisy
    likelihood, and each gold label drawn from its row."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, 5)) + np.log(SHARES)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return p, np.array([rng.choice(5, p=row) for row in p])


def test_expected_weighted_f1_by_hand():
    p = np.array([[0.6, 0.4], [0.3, 0.7]])
    # argmax: row 0 -> class 0, row 1 -> class 1; E[TP] 0.6 and 0.7; predicted 1 each; expected positives 0.9, 1.1
    want = 2 * 0.6 / (1 + 0.9) + 2 * 0.7 / (1 + 1.1)
    assert expected_weighted_f1(p, [0, 0], np.ones(2)) == pytest.approx(want)
    # class 1 pushed up: both rows -> class 1, class 0 predicted never (its F1 0)
    assert expected_weighted_f1(p, [0, 1], np.ones(2)) == pytest.approx(2 * 1.1 / (2 + 1.1))
    assert expected_weighted_f1(p, [0, 0], np.array([1.0, 2.0])) == pytest.approx(2 * 0.6 / 1.9 + 2 * 2 * 0.7 / 2.1)


def test_offsets_raise_the_true_score_of_a_calibrated_model_on_new_data():
    p, gold = calibrated(3000, seed=0)
    d = f1_offsets(p)
    assert d[int(p.sum(0).argmax())] == 0  # the reference class (无风险 here)
    assert d[HIGH_RISK_INDEX] > 0  # the rare class that weighs 2 is called more often than argmax calls it
    assert expected_weighted_f1(p, d) > expected_weighted_f1(p, np.zeros(5))
    # found without labels, they raise the real score, also on images they were not computed on
    for probs, labels in (calibrated(3000, seed=0), calibrated(3000, seed=1)):
        assert weighted_f1(labels, (np.log(probs) + d).argmax(1)) > weighted_f1(labels, probs.argmax(1)) + 0.2


def test_offsets_of_nothing_and_of_a_certain_model():
    assert f1_offsets(np.empty((0, 5))).tolist() == [0.0] * 5
    certain = np.eye(5)[[0, 1, 2, 3, 3, 3, 4]]  # one-hot rows: argmax is already perfect; no move strictly helps
    assert f1_offsets(certain).tolist() == [0.0] * 5
    assert WEIGHTS.tolist() == [2.0, 1.5, 1.0, 1.0, 1.0]


def test_search_starts_from_the_decisions():
    p, gold = calibrated(400, seed=2)
    p2 = np.full(len(gold), 0.5)  # an unsure specialist: beta has nothing to work with
    d = f1_offsets(p)
    start = search(p, p2, gold, folds=3, repeats=1, decision_offsets=d, se_factor=100.0)  # the guard keeps identity
    assert start.setting == "identity" and start.params.beta == 0 and start.params.offsets == pytest.approx(d)
    assert start.decision_offsets == pytest.approx(d)
    assert start.argmax_weighted_f1 == pytest.approx(weighted_f1(gold, p.argmax(1)))
    assert start.identity_weighted_f1 == pytest.approx(weighted_f1(gold, (np.log(p) + d).argmax(1)))
    free = search(p, p2, gold, folds=3, repeats=1, decision_offsets=d, se_factor=0.0)
    if free.setting != "identity":  # what the search fits is added to the decisions
        fitted = np.array(free.params.offsets) - d
        assert free.train_weighted_f1 == pytest.approx(
            weighted_f1(gold, (np.log(np.clip(p, 1e-6, 1)) + d + fitted).argmax(1)))


def test_cli_writes_the_decisions_and_can_start_from_argmax(tmp_path, capsys):
    p, gold = calibrated(200, seed=3)
    names = [f"v{i}.jpg" for i in range(len(gold))]
    test_p, _ = calibrated(300, seed=4)
    write_probs(tmp_path / "s1.csv", names, p)
    write_probs(tmp_path / "s2.csv", names, np.tile([0.5, 0.5, 0, 0, 0], (len(gold), 1)))
    write_probs(tmp_path / "test.csv", [f"t{i}.jpg" for i in range(300)], test_p)
    (tmp_path / "gold.txt").write_text("".join(f"{n}\t{LABELS[g]}\n" for n, g in zip(names, gold)), encoding="utf-8")
    common = ["--stage1", str(tmp_path / "s1.csv"), "--stage2", str(tmp_path / "s2.csv"), "--gold",
              str(tmp_path / "gold.txt"), "--folds", "3", "--repeats", "1"]
    assert main([*common, "--output", str(tmp_path / "f1.json"), "--unlabelled", str(tmp_path / "test.csv")]) == 0
    out = capsys.readouterr().out
    assert "maximise the expected weighted F1 of stage 1 on 500 images (no labels used)" in out
    written = json.loads((tmp_path / "f1.json").read_text(encoding="utf-8"))
    assert written["decision_offsets"] == pytest.approx(f1_offsets(np.vstack([p, test_p])).tolist())
    assert any(v != 0 for v in written["decision_offsets"])
    assert main([*common, "--output", str(tmp_path / "argmax.json"), "--decisions", "argmax"]) == 0
    assert json.loads((tmp_path / "argmax.json").read_text(encoding="utf-8"))["decision_offsets"] == [0.0] * 5
    assert main([*common, "--output", str(tmp_path / "x.json"), "--unlabelled", str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv" in capsys.readouterr().err



def test_the_start_that_cross_validates_better_is_kept(tmp_path, capsys):
    """The search runs from the decisions and from plain argmax; the held-out labels pick. Gold = the decisions' own
    calls: kept; gold = stage 1's argmax (probabilities that lie about calibration): not used; gold drawn from the
    calibrated rows: whichever start's CV score is higher."""
    p, gold = calibrated(300, seed=5)
    d = f1_offsets(p)
    names = [f"v{i}.jpg" for i in range(len(gold))]
    write_probs(tmp_path / "s1.csv", names, p)
    write_probs(tmp_path / "s2.csv", names, np.tile([0.5, 0.5, 0, 0, 0], (len(gold), 1)))
    common = ["--stage1", str(tmp_path / "s1.csv"), "--stage2", str(tmp_path / "s2.csv"), "--gold",
              str(tmp_path / "gold.txt"), "--output", str(tmp_path / "f.json"), "--folds", "3", "--repeats", "1"]
    for labels, expect in (((np.log(p) + d).argmax(1), True), (p.argmax(1), False), (gold, None)):
        (tmp_path / "gold.txt").write_text("".join(f"{n}\t{LABELS[g]}\n" for n, g in zip(names, labels)),
                                           encoding="utf-8")
        assert main(common) == 0
        out = capsys.readouterr().out
        from_d = search(p, np.full(len(p), 0.5), labels, folds=3, repeats=1, seed=42, decision_offsets=d)
        plain = search(p, np.full(len(p), 0.5), labels, folds=3, repeats=1, seed=42)
        kept = from_d.cv_weighted_f1 >= plain.cv_weighted_f1
        assert expect is None or kept is expect
        assert f"from plain argmax: {'kept' if kept else 'not used'}" in out
        written = json.loads((tmp_path / "f.json").read_text(encoding="utf-8"))
        assert written["decision_offsets"] == pytest.approx(d.tolist() if kept else [0.0] * 5)
