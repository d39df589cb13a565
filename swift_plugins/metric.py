"""Eval metric plugin (`--eval_metric weighted_f1`): the competition score on the validation split.

Logged at every evaluation (HF adds the `eval_` prefix): weighted_f1 (Σ w·F1, max 6.5), accuracy,
high_risk_recall, high_risk_precision and f1_<label> for each label. Choose the best checkpoint with
`--metric_for_best_model weighted_f1 --greater_is_better true` (train.sh does when the metric is on).

The prediction is what tools.model.score reads at test time: the argmax over the five labels' first tokens at the
position where the answer starts (teacher forcing: one forward pass, no generation). The gold label is the
answer's first token. With `--task_type seq_cls` it is the argmax of the class logits and the class index.
Needs a validation split (`--val_dataset` or `--split_dataset_ratio`) and an eval strategy.
"""
from __future__ import annotations


import numpy as np
import torch
from swift.metrics import eval_metrics_map
from swift.metrics.base import EvalMetrics
from swift.utils import get_logger, is_master

from swift_plugins._common import AnswerTokens
from tools.report.metrics import Evaluation, evaluate
from tools.task import HIGH_RISK_INDEX, LABELS

logger = get_logger()


def task_metrics(s: Evaluation) -> dict[str, float]:
    """The numbers logged at each evaluation, from tools.report.metrics."""
    out = {"weighted_f1": s.weighted_f1, "accuracy": s.accuracy,
           "high_risk_recall": float(s.recall[HIGH_RISK_INDEX]),
           "high_risk_precision": float(s.precision[HIGH_RISK_INDEX])}
    out.update({f"f1_{label}": float(s.f1[i]) for i, label in enumerate(LABELS)})
    return out


class WeightedF1Metrics(EvalMetrics):

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.tokens = AnswerTokens(trainer.template.tokenizer)

    def preprocess_logits_for_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, 2]: (predicted label index, gold label index or -1), so the evaluation keeps no vocabulary logits."""
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        if logits.dim() == 2:  # seq_cls: class logits, class labels
            return torch.stack([logits.argmax(-1), labels.long().to(logits.device)], -1)
        first, gold = self.tokens.first_answer(labels)
        rows = torch.arange(logits.shape[0], device=logits.device)
        # Logits at position t predict the token at t + 1 (labels are not shifted).
        step = logits[rows, (first - 1).clamp(min=0).to(logits.device)]
        pred = step[:, self.tokens.label_ids.to(logits.device)].argmax(-1)
        return torch.stack([pred, gold.to(logits.device)], -1)

    def compute_metrics(self, eval_prediction) -> dict[str, float]:
        pairs = np.asarray(eval_prediction.predictions).reshape(-1, 2)
        pairs = pairs[pairs[:, 1] >= 0]  # rows whose answer is not one of the labels, and DDP padding
        if len(pairs) == 0:
            return {}
        evaluation = evaluate(pairs[:, 1], pairs[:, 0])
        if is_master():
            logger.info(f"weighted_f1 on {len(pairs)} validation rows:\n{evaluation.table()}")
        return task_metrics(evaluation)


eval_metrics_map["weighted_f1"] = WeightedF1Metrics
