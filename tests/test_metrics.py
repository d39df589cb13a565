"""The competition score against a hand-computed example."""
from __future__ import annotations

import numpy as np
import pytest

from tools.metrics import confusion_matrix, score


def test_weighted_f1_hand_computed():
    # gold:  高 高 中 中 低 无 无 非      pred: 高 中 中 中 无 无 无 高
    gold = [0, 0, 1, 1, 2, 3, 3, 4]
    pred = [0, 1, 1, 1, 3, 3, 3, 0]
    s = score(gold, pred)
    # 高: tp 1, predicted 2, actual 2 -> P .5 R .5 F1 .5
    # 中: tp 2, predicted 3, actual 2 -> P 2/3 R 1 F1 .8
    # 低: tp 0 -> F1 0;  无: tp 2, predicted 3, actual 2 -> F1 .8;  非: tp 0 -> F1 0
    assert s.f1 == pytest.approx([0.5, 0.8, 0.0, 0.8, 0.0])
    assert s.weighted_f1 == pytest.approx(2.0 * 0.5 + 1.5 * 0.8 + 0.8)
    assert s.accuracy == pytest.approx(5 / 8)
    assert s.confusion[0].tolist() == [1, 1, 0, 0, 0] and s.confusion[4].tolist() == [1, 0, 0, 0, 0]


def test_majority_baseline_matches_the_issue():
    gold = [3] * 59 + [1] * 19 + [2] * 14 + [0] * 5 + [4] * 3
    assert score(gold, [3] * 100).weighted_f1 == pytest.approx(0.742, abs=1e-3)


def test_perfect_prediction_scores_max():
    gold = np.arange(5).repeat(3)
    assert score(gold, gold).weighted_f1 == pytest.approx(6.5)


def test_confusion_shape_check():
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0])
