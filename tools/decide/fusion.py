"""Fuse the two stages: final = stage-1 confidence × high-risk correction coefficient, renormalised.

    logit_c = log p1_c + offset_c + [c = 高风险] · beta · logit(p2)
    fused   = softmax(logit)

p1 is stage 1's five-label distribution, p2 the stage-2 specialist's probability of 高风险. The correction
coefficient exp(beta · logit(p2)) = (p2 / (1 - p2))^beta is 1 when the specialist is unsure (p2 = 0.5),
boosts 高风险 when it is confident and damps it when it is sure there is none. beta = 0 with zero offsets is
the identity: stage 1 alone. Per-class log-prior offsets shift decision thresholds toward the competition score.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tools.fileio import read_json, write_json
from tools.report.metrics import EPS, log_probs
from tools.task import HIGH_RISK_INDEX, LABELS

@dataclass
class FusionParams:
    beta: float = 1.0
    offsets: list[float] = field(default_factory=lambda: [0.0] * len(LABELS))

    @classmethod
    def identity(cls) -> "FusionParams":
        return cls(beta=0.0)

    @classmethod
    def load(cls, path: str | Path) -> "FusionParams":
        raw = read_json(path)
        params = cls(beta=float(raw["beta"]), offsets=[float(v) for v in raw["offsets"]])
        if len(params.offsets) != len(LABELS):
            raise ValueError(f"{path}: offsets must have {len(LABELS)} values, one per label")
        return params

    def save(self, path: str | Path, **extra) -> None:
        write_json(path, {**asdict(self), "labels": list(LABELS), **extra})


def features(p1: np.ndarray, p2_high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log p1 [N, 5], logit p2 [N]), clipped away from 0 and 1; computed once, fused with many params."""
    p2 = np.clip(np.asarray(p2_high, dtype=np.float64), EPS, 1 - EPS)
    return log_probs(p1), np.log(p2) - np.log1p(-p2)


def fused_logits(log_p1: np.ndarray, logit2: np.ndarray, beta: float, offsets) -> np.ndarray:
    """The fused log-probabilities before normalisation; their argmax is the fused label."""
    s = log_p1 + np.asarray(offsets, dtype=np.float64)
    s[:, HIGH_RISK_INDEX] += beta * logit2
    return s


def fuse(p1: np.ndarray, p2_high: np.ndarray, params: FusionParams) -> np.ndarray:
    """[N, 5] fused probabilities from [N, 5] stage-1 probabilities and [N] stage-2 高风险 probabilities."""
    logits = fused_logits(*features(p1, p2_high), params.beta, params.offsets)
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)
