"""Prior correction: a model trained on rebalanced rows, brought back to the data's class shares."""
from __future__ import annotations

import numpy as np
import pytest

from tools.model import prior


def posterior(likelihood: np.ndarray, shares) -> np.ndarray:
    p = likelihood * np.asarray(shares)
    return p / p.sum(1, keepdims=True)


def test_correction_turns_the_trained_posterior_into_the_real_one():
    rng = np.random.default_rng(0)
    likelihood = rng.uniform(0.01, 1, (200, 5))  # p(x|c) of 200 images
    real = np.array([0.03, 0.19, 0.14, 0.59, 0.05])  # the official shares
    trained = np.array([0.30, 0.17, 0.13, 0.33, 0.07])  # 高风险 repeated up to 30 % of the rows
    learned = posterior(likelihood, trained)  # what a perfectly trained model outputs
    corrected = prior.correct(learned, trained, real)
    np.testing.assert_allclose(corrected, posterior(likelihood, real), atol=1e-12)
    assert (corrected.argmax(1) == 0).sum() < (learned.argmax(1) == 0).sum()  # fewer 高风险 calls
    np.testing.assert_allclose(prior.correct(learned, trained, trained), learned, atol=1e-12)  # same shares: as is


def test_binary_and_edge_cases():
    p = np.array([[0.6, 0.4], [0.2, 0.8]])
    out = prior.correct(p, [0.3, 0.7], [0.03, 0.97])
    assert out[0, 0] < 0.6 and np.allclose(out.sum(1), 1)
    kept = prior.correct(np.array([[0.5, 0.5]]), [0.0, 1.0], [0.1, 0.9])  # a class absent from the rows: no undo
    np.testing.assert_allclose(kept, [[0.5 / (0.5 + 0.45), 0.45 / (0.5 + 0.45)]])
    with pytest.raises(ValueError, match="classes"):
        prior.correct(np.ones((1, 5)) / 5, [0.5, 0.5], [0.5, 0.5])


def test_the_knob(monkeypatch):
    monkeypatch.delenv("PRIOR_CORRECTION", raising=False)
    assert prior.wanted() is True
    monkeypatch.setenv("PRIOR_CORRECTION", "0")
    assert prior.wanted() is False
    monkeypatch.setenv("PRIOR_CORRECTION", "yes")
    with pytest.raises(ValueError, match="PRIOR_CORRECTION"):
        prior.wanted()
