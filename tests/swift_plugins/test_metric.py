"""swift_plugins/metric.py (weighted_f1): the score from (prediction, gold) pairs, where it reads the prediction,
and that it picks the best checkpoint of a training run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import stub_trainer
from tools.task import HIGH_RISK, LABELS


def test_metric_matches_hand_computed_confusion(loaded):
    from transformers.trainer_utils import EvalPrediction

    from swift_plugins.metric import WeightedF1Metrics

    metric = WeightedF1Metrics(None, stub_trainer(loaded[1]))
    gold = [0, 0, 0, 1, 1, 2, 3, 3, 3, 4, -1]  # the last row's answer is not a label: ignored
    pred = [0, 0, 1, 1, 2, 2, 3, 3, 0, 4, 3]
    # Confusion (rows gold): 高 [2 1 0 0 0], 中 [0 1 1 0 0], 低 [0 0 1 0 0], 无 [1 0 0 2 0], 非 [0 0 0 0 1]
    # F1 = 2·tp / (predicted + actual): 高 4/6, 中 2/4, 低 2/3, 无 4/5, 非 2/2.
    f1 = [4 / 6, 2 / 4, 2 / 3, 4 / 5, 1.0]
    out = metric.compute_metrics(EvalPrediction(predictions=np.array(list(zip(pred, gold))), label_ids=None))
    assert out["weighted_f1"] == pytest.approx(2 * f1[0] + 1.5 * f1[1] + f1[2] + f1[3] + f1[4])
    assert out["weighted_f1"] == pytest.approx(4.55)
    assert out["high_risk_recall"] == pytest.approx(2 / 3)
    assert out["high_risk_precision"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(7 / 10)
    for label, value in zip(LABELS, f1):
        assert out[f"f1_{label}"] == pytest.approx(value)
    empty = metric.compute_metrics(EvalPrediction(predictions=np.array([[0, -1]]), label_ids=None))
    assert empty == {}  # no row with a label answer: nothing to report


def test_metric_reads_prediction_at_answer_start(loaded):
    from swift_plugins._common import AnswerTokens
    from swift_plugins.metric import WeightedF1Metrics

    tok = loaded[1].tokenizer
    metric = WeightedF1Metrics(None, stub_trainer(loaded[1]))
    ids = AnswerTokens(tok).label_ids
    vocab = len(tok) + 8
    labels = torch.full((3, 6), -100)
    labels[0, 3:5] = torch.tensor([ids[0], 7])   # gold 高风险, answer starts at 3
    labels[1, 2:4] = torch.tensor([ids[3], 7])   # gold 无风险, answer starts at 2
    labels[2, 4] = 11                            # an answer that is not a label
    logits = torch.zeros(3, 6, vocab)
    logits[0, 2, ids[1]] = 5.0                   # position 2 predicts position 3: 中风险
    logits[0, 3, ids[0]] = 9.0                   # (the next position must not be read)
    logits[1, 1, ids[3]] = 5.0
    logits[1, 1, 100] = 50.0                     # a non-label token wins overall but is not a label
    pairs = metric.preprocess_logits_for_metrics(logits, labels)
    assert pairs.tolist() == [[1, 0], [3, 3], [pairs[2, 0].item(), -1]]
    seq_cls = metric.preprocess_logits_for_metrics(torch.tensor([[0., 3, 1, 0, 0], [5., 0, 0, 0, 1]]),
                                                   torch.tensor([1, 4]))
    assert seq_cls.tolist() == [[1, 1], [0, 4]]


def test_metric_chooses_best_checkpoint(trained):
    evals = [entry for entry in trained.result["log_history"] if "eval_weighted_f1" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    for entry in evals:
        assert 0 <= entry["eval_weighted_f1"] <= 6.5
        assert f"eval_f1_{HIGH_RISK}" in entry and "eval_high_risk_recall" in entry
    state = json.loads((trained.run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(max(entry["eval_weighted_f1"] for entry in evals))
    best_step = max(evals, key=lambda entry: (entry["eval_weighted_f1"], -entry["step"]))["step"]
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"
    # tools.model.checkpoint (train.sh) follows the metric's choice
    from tools.model.checkpoint import find_checkpoint

    assert find_checkpoint(trained.run).name == f"checkpoint-{best_step}"
