"""Prior correction (logit adjustment): a model trained on rows whose class shares differ from the data's.

The stage sets are rebalanced (高风险 ×10 copies and repeats in stage 1: ~24-34 % of the rows against ~3 % of the
official images), so a model learns p_trained(c|x) ∝ p(x|c) · trained_c. The data's own shares `real` give the
probabilities the competition's images call for: p(c|x) ∝ p_trained(c|x) · real_c / trained_c. tools.model.score
applies this to every stage's probabilities with the shares recorded beside its checkpoint (trained_on.json,
tools.model.checkpoint start), so fusion and the report work on corrected probabilities. PRIOR_CORRECTION=0
turns it off.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

EPS = 1e-12


def correct(probs: np.ndarray, trained: Sequence[float], real: Sequence[float]) -> np.ndarray:
    """Rows of `probs` [N, K] reweighted by real/trained per class and renormalised (a class absent from the
    training rows keeps its weight: there is nothing to undo)."""
    trained, real = np.asarray(trained, dtype=np.float64), np.asarray(real, dtype=np.float64)
    if probs.shape[-1] != len(trained) or len(trained) != len(real):
        raise ValueError(f"{probs.shape[-1]} classes but {len(trained)} trained and {len(real)} real shares")
    ratio = np.where(trained > EPS, real / np.maximum(trained, EPS), 1.0)
    out = np.asarray(probs, dtype=np.float64) * ratio
    return out / np.maximum(out.sum(-1, keepdims=True), EPS)


def wanted() -> bool:
    """PRIOR_CORRECTION=1 (default) or 0."""
    policy = os.environ.get("PRIOR_CORRECTION", "1").strip()
    if policy not in ("0", "1"):
        raise ValueError(f"PRIOR_CORRECTION={policy!r}: expected 0 or 1")
    return policy == "1"
