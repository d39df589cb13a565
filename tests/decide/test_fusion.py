"""tools.decide.fusion: stage-1 confidence × the specialist's high-risk correction, and its parameters."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tools.decide.fusion import FusionParams, features, fuse, fused_logits
from tools.task import HIGH_RISK_INDEX, LABELS

P1 = np.array([[0.30, 0.40, 0.10, 0.15, 0.05],   # stage 1 says 中, close to 高
               [0.05, 0.05, 0.10, 0.75, 0.05],   # clearly 无
               [0.45, 0.35, 0.10, 0.05, 0.05]])  # says 高


def test_identity_params_return_stage1():
    fused = fuse(P1, np.array([0.99, 0.99, 0.01]), FusionParams.identity())
    np.testing.assert_allclose(fused, P1 / P1.sum(1, keepdims=True), atol=1e-9)
    assert (fused.argmax(1) == P1.argmax(1)).all()


def test_specialist_moves_high_risk_both_ways():
    fused = fuse(P1, np.array([0.9, 0.9, 0.1]), FusionParams(beta=1.0))
    assert LABELS[fused[0].argmax()] == "高风险"   # confident specialist promotes 高
    assert LABELS[fused[1].argmax()] == "无风险"   # but cannot overturn a clear stage-1 answer
    assert LABELS[fused[2].argmax()] == "中风险"   # a confident 'no' demotes 高
    np.testing.assert_allclose(fused.sum(1), 1.0)
    # coefficient = (p2 / (1 - p2))^beta: p2 = 0.9, beta 1 -> 9× the 高 odds against the others
    ratio = (fused[0, 0] / fused[0, 1]) / (P1[0, 0] / P1[0, 1])
    assert ratio == pytest.approx(9.0)


def test_unsure_specialist_changes_nothing():
    np.testing.assert_allclose(fuse(P1, np.full(3, 0.5), FusionParams(beta=2.0)), P1, atol=1e-9)


def test_offsets_are_log_prior_shifts():
    offsets = [0.0, np.log(2.0), 0.0, 0.0, 0.0]  # doubles 中's odds against every other class
    fused = fuse(P1, np.full(3, 0.5), FusionParams(beta=1.0, offsets=offsets))
    np.testing.assert_allclose((fused[:, 1] / fused[:, 3]) / (P1[:, 1] / P1[:, 3]), 2.0)
    log_p1, logit2 = features(P1, np.array([0.9, 0.5, 0.1]))
    s = fused_logits(log_p1, logit2, 2.0, offsets)
    np.testing.assert_allclose(s[:, [1, 2, 3, 4]], np.log(P1[:, [1, 2, 3, 4]]) + np.array(offsets)[[1, 2, 3, 4]])
    np.testing.assert_allclose(s[:, HIGH_RISK_INDEX], np.log(P1[:, 0]) + 2.0 * np.log([9.0, 1.0, 1 / 9]))


def test_extreme_probabilities_stay_finite():
    p1 = np.array([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    fused = fuse(p1, np.array([0.0, 1.0]), FusionParams(beta=3.0))
    assert np.isfinite(fused).all() and fused.sum(1) == pytest.approx([1, 1])


def test_params_roundtrip(tmp_path):
    p = FusionParams(beta=0.5, offsets=[0.1, 0, 0, -0.2, 0])
    p.save(tmp_path / "f.json", note="x")
    assert FusionParams.load(tmp_path / "f.json") == p
    raw = json.loads((tmp_path / "f.json").read_text(encoding="utf-8"))
    assert raw["labels"] == list(LABELS) and raw["note"] == "x"
    (tmp_path / "bad.json").write_text(json.dumps({"beta": 1, "offsets": [0, 0]}), encoding="utf-8")
    with pytest.raises(ValueError, match="offsets must have 5 values"):
        FusionParams.load(tmp_path / "bad.json")
    assert FusionParams() == FusionParams(beta=1.0, offsets=[0.0] * 5)
