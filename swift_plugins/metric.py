"""Eval metric plugin (`--eval_metric weighted_f1`): the competition score on the validation split, and the
high-risk-vs-rest quality that fusion uses.

Logged at every evaluation (HF adds the `eval_` prefix): weighted_f1 (Σ w·F1, max 6.5), accuracy,
high_risk_recall, high_risk_precision, f1_<label> for each label, and for the 高风险-vs-rest question:
high_risk_auc (ROC AUC of p(高风险) against gold == 高风险, ties counted half; 0.5 when the validation rows hold
only one of the two classes, with a warning) and high_risk_f1 (F1 of argmax == 高风险; the same number as
f1_高风险, under the name stage 2's checkpoint choice uses). Choose the best checkpoint with
`--metric_for_best_model weighted_f1 --greater_is_better true` (stage 1), or `high_risk_auc` for the specialist
(stage 2), whose p(高风险) is what fusion reads.

The prediction is what tools.model.score reads at test time: the softmax over the five labels' first tokens at the
position where the answer starts (teacher forcing: one forward pass, no generation), its argmax the predicted
label; the gold label is the answer's first token. With `--task_type seq_cls` it is the softmax of the class logits
and the class index. Only [batch, 7] numbers per batch are kept (prediction, gold, five probabilities), never the
vocabulary logits. Needs a validation split (`--val_dataset` or `--split_dataset_ratio`) and an eval strategy.
"""
from __future__ import annotations

import numpy as np
import torch
from swift.metrics import eval_metrics_map
from swift.metrics.base import EvalMetrics
from swift.utils import get_logger, is_master

from swift_plugins._common import AnswerTokens
from tools.report.metrics import Evaluation, evaluate, roc_auc
from tools.task import HIGH_RISK_INDEX, LABELS

logger = get_logger()


def task_metrics(s: Evaluation) -> dict[str, float]:
    """The numbers logged at each evaluation, from tools.report.metrics."""
    out = {"weighted_f1": s.weighted_f1, "accuracy": s.accuracy,
           "high_risk_recall": float(s.recall[HIGH_RISK_INDEX]),
           "high_risk_precision": float(s.precision[HIGH_RISK_INDEX]),
           "high_risk_f1": float(s.f1[HIGH_RISK_INDEX])}
    out.update({f"f1_{label}": float(s.f1[i]) for i, label in enumerate(LABELS)})
    return out


class WeightedF1Metrics(EvalMetrics):

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.tokens = AnswerTokens(trainer.template.tokenizer)

    def preprocess_logits_for_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, 2 + K] float: (predicted label index, gold label index or -1, p of each label): K = 5 in LABELS
        order, or K = 2 for a binary head (高风险, 非高风险)."""
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        if logits.dim() == 2:  # seq_cls: class logits, class labels
            label_logits, gold = logits, labels.long().to(logits.device)
        else:
            first, gold = self.tokens.first_answer(labels)
            rows = torch.arange(logits.shape[0], device=logits.device)
            # Logits at position t predict the token at t + 1 (labels are not shifted).
            step = logits[rows, (first - 1).clamp(min=0).to(logits.device)]
            label_logits, gold = step[:, self.tokens.label_ids_on(logits.device)], gold.to(logits.device)
        label_logits = label_logits.float()
        probs = label_logits.softmax(-1)
        return torch.cat([label_logits.argmax(-1, keepdim=True).float(), gold.float()[:, None], probs], -1)

    def compute_metrics(self, eval_prediction) -> dict[str, float]:
        predictions = np.asarray(eval_prediction.predictions, dtype=np.float64)
        # [N, 7] (or [N, 4], a binary head) from preprocess_logits_for_metrics; [N, 2] (prediction, gold) pairs
        # alone give no AUC.
        widths = (2 + len(LABELS), 2 + 2)
        width = predictions.shape[-1] if predictions.ndim == 2 and predictions.shape[-1] in widths else 2
        rows = predictions.reshape(-1, width)
        rows = rows[rows[:, 1] >= 0]  # rows whose answer is not one of the labels, and DDP padding (-100)
        if len(rows) == 0:
            return {}
        gold, pred = rows[:, 1].astype(int), rows[:, 0].astype(int)
        evaluation = evaluate(gold, pred)
        out = task_metrics(evaluation)
        if width > 2:
            auc = roc_auc(gold == HIGH_RISK_INDEX, rows[:, 2 + HIGH_RISK_INDEX])
            if auc is None:
                logger.warning(f"high_risk_auc: the {len(rows)} validation rows hold only one class of "
                               f"{LABELS[HIGH_RISK_INDEX]}-vs-rest; logged as 0.5")
            out["high_risk_auc"] = 0.5 if auc is None else auc
        if is_master():
            auc_text = f"   high_risk_auc {out['high_risk_auc']:.4f}" if "high_risk_auc" in out else ""
            logger.info(f"weighted_f1 on {len(rows)} validation rows{auc_text}:\n{evaluation.table()}")
        return out


eval_metrics_map["weighted_f1"] = WeightedF1Metrics
