"""swift_plugins/metric.py (weighted_f1): the score from (prediction, gold) pairs, where it reads the prediction,
the high-risk-vs-rest AUC and F1 from the label probabilities, and that it picks the best checkpoint of a training
run."""
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
    assert out["high_risk_f1"] == pytest.approx(f1[0])
    assert "high_risk_auc" not in out  # (prediction, gold) pairs carry no probabilities
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
    rows = metric.preprocess_logits_for_metrics(logits, labels)
    assert rows.shape == (3, 2 + len(LABELS))  # no vocabulary logits kept
    assert rows[:, :2].tolist() == [[1, 0], [3, 3], [rows[2, 0].item(), -1]]
    # The probabilities are the softmax over the five label tokens only (the 50.0 logit does not count).
    torch.testing.assert_close(rows[1, 2:], torch.softmax(logits[1, 1, ids], -1))
    assert rows[1, 2 + 3] > 0.9
    seq_cls = metric.preprocess_logits_for_metrics(torch.tensor([[0., 3, 1, 0, 0], [5., 0, 0, 0, 1]]),
                                                   torch.tensor([1, 4]))
    assert seq_cls[:, :2].tolist() == [[1, 1], [0, 4]]
    torch.testing.assert_close(seq_cls[:, 2:], torch.softmax(torch.tensor([[0., 3, 1, 0, 0], [5., 0, 0, 0, 1]]), -1))


# Four label-probability rows (LABELS order: 高 中 低 无 非): p(高) 0.9, 0.5, 0.2, 0.1; argmax 高, 高, 低, 非.
P = {"A": [0.9, 0.025, 0.025, 0.025, 0.025], "B": [0.5, 0.125, 0.125, 0.125, 0.125],
     "C": [0.2, 0.1, 0.5, 0.1, 0.1], "D": [0.1, 0.1, 0.1, 0.1, 0.6]}
# Gold 高风险 for A, B, B; the rest B (中风险), C (低风险), A (无风险), D (非楼道): equal rows tie exactly.
ROWS = [("A", 0), ("B", 0), ("B", 0), ("B", 1), ("C", 2), ("A", 3), ("D", 4)]
# AUC by hand, positive vs negative p(高) pairs, ties half: 0.9 vs (0.5, 0.2, 0.9, 0.1) = 1 + 1 + ½ + 1;
# each 0.5 vs (0.5, 0.2, 0.9, 0.1) = ½ + 1 + 0 + 1; (3.5 + 2.5 + 2.5) / (3 · 4) = 17/24.
AUC = 17 / 24
# argmax == 高风险: TP 3 (A, B, B), FP 2 (B of 中风险, A of 无风险), FN 0: F1 = 2·3 / (5 + 3).
HIGH_F1 = 6 / 8


def causal_batch(tok):
    """[B, T, V] logits and unshifted labels whose answers start at position 3 (read at position 2)."""
    from swift_plugins._common import AnswerTokens

    ids = AnswerTokens(tok).label_ids
    logits = torch.randn(len(ROWS), 5, len(tok) + 8, generator=torch.Generator().manual_seed(0))
    labels = torch.full((len(ROWS), 5), -100)
    for i, (key, gold) in enumerate(ROWS):
        logits[i, 2, ids] = torch.tensor(P[key]).log()
        logits[i, 2, 100] = 60.0  # not a label: ignored
        labels[i, 3:5] = torch.tensor([ids[gold], 7])
    return logits, labels


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_high_risk_auc_and_f1_by_hand(loaded, task):
    from transformers.trainer_utils import EvalPrediction

    from swift_plugins.metric import WeightedF1Metrics

    metric = WeightedF1Metrics(None, stub_trainer(loaded[1]))
    if task == "causal_lm":
        logits, labels = causal_batch(loaded[1].tokenizer)
    else:  # the classification head's logits and class indices
        logits = torch.tensor([P[key] for key, _ in ROWS]).log() + 3.0
        labels = torch.tensor([gold for _, gold in ROWS])
    rows = metric.preprocess_logits_for_metrics(logits, labels)
    torch.testing.assert_close(rows[:, 2], torch.tensor([P[key][0] for key, _ in ROWS]))
    # Two evaluation batches, concatenated as HF does, with a DDP padding row.
    batches = np.concatenate([rows[:4].numpy(), rows[4:].numpy(), np.full((1, 7), -100.0)])
    out = metric.compute_metrics(EvalPrediction(predictions=batches, label_ids=None))
    assert out["high_risk_auc"] == pytest.approx(AUC, abs=1e-12)
    assert out["high_risk_f1"] == pytest.approx(HIGH_F1)
    assert out["high_risk_recall"] == 1.0 and out["high_risk_precision"] == pytest.approx(3 / 5)
    assert out["accuracy"] == pytest.approx(5 / 7)


def test_high_risk_auc_edge_cases(loaded):
    from transformers.trainer_utils import EvalPrediction

    from swift_plugins.metric import WeightedF1Metrics, roc_auc

    metric = WeightedF1Metrics(None, stub_trainer(loaded[1]))
    logits, labels = causal_batch(loaded[1].tokenizer)
    rows = metric.preprocess_logits_for_metrics(logits, labels).numpy()
    negatives = rows[rows[:, 1] != 0]  # no 高风险 among the gold labels: no ranking to measure
    out = metric.compute_metrics(EvalPrediction(predictions=negatives, label_ids=None))
    assert out["high_risk_auc"] == 0.5 and out["high_risk_f1"] == 0.0
    assert roc_auc([True, True], [0.3, 0.4]) is None and roc_auc([False], [0.1]) is None
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0 and roc_auc([True, False], [0.1, 0.9]) == 0.0
    assert roc_auc([True, False, True, False], [0.5] * 4) == 0.5
    # Against the pairwise definition on many ties.
    rng = np.random.default_rng(0)
    score = rng.integers(0, 6, 300) / 5
    positive = rng.random(300) < 0.2
    pos, neg = score[positive][:, None], score[~positive][None, :]
    assert roc_auc(positive, score) == pytest.approx(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_metric_chooses_best_checkpoint(trained):
    evals = [entry for entry in trained.result["log_history"] if "eval_weighted_f1" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    for entry in evals:
        assert 0 <= entry["eval_weighted_f1"] <= 6.5
        assert f"eval_f1_{HIGH_RISK}" in entry and "eval_high_risk_recall" in entry
        assert 0 <= entry["eval_high_risk_auc"] <= 1 and entry["eval_high_risk_f1"] == entry[f"eval_f1_{HIGH_RISK}"]
    state = json.loads((trained.run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(max(entry["eval_weighted_f1"] for entry in evals))
    best_step = max(evals, key=lambda entry: (entry["eval_weighted_f1"], -entry["step"]))["step"]
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"
    # tools.model.checkpoint (train.sh) follows the metric's choice
    from tools.model.checkpoint import find_checkpoint

    assert find_checkpoint(trained.run).name == f"checkpoint-{best_step}"
