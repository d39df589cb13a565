"""The competition score and its parts: confusion matrix, per-class precision/recall/F1, Σ w·F1.

Pure functions over label indices (tools.task.LABELS order), shared by test.sh, the fusion search and the
swift eval metric plugin, so every number the project prints is computed one way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tools.task import CLASS_WEIGHTS, LABELS, MAX_SCORE

WEIGHTS = np.array([CLASS_WEIGHTS[label] for label in LABELS])
EPS = 1e-6  # probabilities are clipped to [EPS, 1] before their log: fusion, decisions and the report agree


def log_probs(p) -> np.ndarray:
    """log p, clipped away from 0 (float64): the scale fusion and the decision offsets work on."""
    return np.log(np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0))


def offset_labels(p, offsets) -> np.ndarray:
    """Label indices chosen by per-class log offsets: argmax(log p + offsets) (tools.decide.decisions)."""
    return (log_probs(p) + np.asarray(offsets, dtype=np.float64)).argmax(1)


def confusion_matrix(gold, pred, n: int = len(LABELS)) -> np.ndarray:
    """counts[i, j] = images of gold class i predicted as class j."""
    gold, pred = np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)
    if gold.shape != pred.shape:
        raise ValueError(f"gold and pred differ in length: {gold.shape} vs {pred.shape}")
    return np.bincount(gold * n + pred, minlength=n * n).reshape(n, n)


@dataclass(frozen=True)
class Evaluation:
    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray

    @property
    def weighted_f1(self) -> float:
        """Σ w·F1, the competition score (max 6.5)."""
        return float((WEIGHTS * self.f1).sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(1, self.confusion.sum()))

    def table(self) -> str:
        lines = [f"weighted F1 {self.weighted_f1:.3f} / {MAX_SCORE:g}   accuracy {self.accuracy:.3f}",
                 "label    weight  precision  recall     F1  support"]
        for i, label in enumerate(LABELS):
            lines.append(f"{label}   {WEIGHTS[i]:>5.1f}  {self.precision[i]:>9.3f}  {self.recall[i]:>6.3f}  "
                         f"{self.f1[i]:>5.3f}  {self.confusion[i].sum():>7d}")
        lines.append("confusion (rows gold, columns predicted): " + " ".join(label[0] for label in LABELS))
        for i, label in enumerate(LABELS):
            lines.append(f"  {label} " + " ".join(f"{v:>4d}" for v in self.confusion[i]))
        return "\n".join(lines)


def f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """F1 per class = 2·tp / (predicted + actual), i.e. 2PR / (P + R); 0 where the class is nowhere."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def evaluation_from_confusion(cm: np.ndarray) -> Evaluation:
    """Precision, recall and F1 per class; a class never predicted (or never present) scores 0 there."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    return Evaluation(cm.astype(int), precision, recall, f1_from_confusion(cm))


def evaluate(gold, pred) -> Evaluation:
    return evaluation_from_confusion(confusion_matrix(gold, pred))


def weighted_f1(gold, pred) -> float:
    """Σ w·F1 without building Evaluation: the fusion search calls this thousands of times."""
    return float((WEIGHTS * f1_from_confusion(confusion_matrix(gold, pred))).sum())


def roc_auc(positive, score) -> float | None:
    """ROC AUC of `score` for the boolean `positive`: P(score of a positive > score of a negative), ties counted
    half (the Mann-Whitney U statistic from average ranks). None when either class is absent."""
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score))
    # Average rank (1-based) of each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(score)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
