"""tools.report.metrics: the competition score against a hand-computed example."""
from __future__ import annotations

import numpy as np
import pytest

from tools.report.metrics import (confusion_matrix, evaluate, evaluation_from_confusion, f1_from_confusion,
                                  weighted_f1)


def test_weighted_f1_hand_computed():
    # gold:  高 高 中 中 低 无 无 非      pred: 高 中 中 中 无 无 无 高
    gold = [0, 0, 1, 1, 2, 3, 3, 4]
    pred = [0, 1, 1, 1, 3, 3, 3, 0]
    s = evaluate(gold, pred)
    # 高: tp 1, predicted 2, actual 2 -> P .5 R .5 F1 .5
    # 中: tp 2, predicted 3, actual 2 -> P 2/3 R 1 F1 .8
    # 低: tp 0 -> F1 0;  无: tp 2, predicted 3, actual 2 -> F1 .8;  非: tp 0 -> F1 0
    assert s.f1 == pytest.approx([0.5, 0.8, 0.0, 0.8, 0.0])
    assert s.weighted_f1 == pytest.approx(2.0 * 0.5 + 1.5 * 0.8 + 0.8)
    assert s.accuracy == pytest.approx(5 / 8)
    assert s.confusion[0].tolist() == [1, 1, 0, 0, 0] and s.confusion[4].tolist() == [1, 0, 0, 0, 0]


def test_majority_baseline_matches_the_issue():
    gold = [3] * 59 + [1] * 19 + [2] * 14 + [0] * 5 + [4] * 3
    assert evaluate(gold, [3] * 100).weighted_f1 == pytest.approx(0.742, abs=1e-3)


def test_perfect_prediction_scores_max():
    gold = np.arange(5).repeat(3)
    assert evaluate(gold, gold).weighted_f1 == pytest.approx(6.5)


def test_confusion_shape_check():
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0])


def test_fast_weighted_f1_matches_the_evaluation():
    rng = np.random.default_rng(1)
    for _ in range(20):
        gold, pred = rng.integers(0, 5, 37), rng.integers(0, 5, 37)
        pred[pred == 2] = 3  # a class never predicted: F1 0 in both
        assert weighted_f1(gold, pred) == pytest.approx(evaluate(gold, pred).weighted_f1)


def test_evaluation_from_a_confusion_matrix():
    cm = np.array([[2, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [1, 0, 0, 2, 0], [0, 0, 0, 0, 0]])
    e = evaluation_from_confusion(cm)
    assert e.precision == pytest.approx([2 / 3, 0.5, 0.5, 1.0, 0.0])  # 非 never predicted: 0, not NaN
    assert e.recall == pytest.approx([2 / 3, 0.5, 1.0, 2 / 3, 0.0])  # 非 never present: 0
    assert f1_from_confusion(cm) == pytest.approx(e.f1) and e.f1[4] == 0.0
    assert e.confusion.dtype.kind == "i" and e.accuracy == pytest.approx(6 / 9)
    table = e.table()
    assert table.startswith("weighted F1 ") and "高风险" in table and len(table.splitlines()) == 2 + 5 + 1 + 5


def test_offset_labels_are_the_fusions_labels_without_stage_2():
    """One clipped log for the report, the decisions and the fusion: with β 0 the fusion's argmax is
    offset_labels', zeros included (clipped, not -inf)."""
    from tools.decide.fusion import features, fused_logits
    from tools.report.metrics import log_probs, offset_labels

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), 200)
    p[:5, 0] = 0.0
    offsets = [1, 0.25, 0.75, 0, 0.25]
    log_p1, logit2 = features(p, rng.random(200))
    np.testing.assert_array_equal(offset_labels(p, offsets), fused_logits(log_p1, logit2, 0.0, offsets).argmax(1))
    assert np.isfinite(log_probs(p)).all() and log_probs(p)[0, 0] == np.log(1e-6)
    assert (offset_labels(p, [0] * 5) == p.argmax(1)).all()
