"""Fusion, the submission writer and tools.predict's checks."""
from __future__ import annotations

import numpy as np
import pytest

from tools.dataset import DataError
from tools.fusion import FusionParams, fuse
from tools.predict import aligned_probs, predict
from tools.score import write_probs
from tools.submission import write_submission
from tools.task import LABELS, Layout

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


def test_params_roundtrip(tmp_path):
    p = FusionParams(beta=0.5, offsets=[0.1, 0, 0, -0.2, 0])
    p.save(tmp_path / "f.json", note="x")
    assert FusionParams.load(tmp_path / "f.json") == p


def test_submission_format(tmp_path):
    path = tmp_path / "b-submit.txt"
    write_submission(path, ["b.jpg", "a.jpg"], ["高风险", "非楼道"])
    raw = path.read_bytes()
    assert raw == "b.jpg\t高风险\na.jpg\t非楼道\n".encode("utf-8")  # list order, no BOM, no header
    with pytest.raises(ValueError, match="more than once"):
        write_submission(path, ["a.jpg", "a.jpg"], ["高风险", "高风险"])
    with pytest.raises(ValueError, match="not a label"):
        write_submission(path, ["a.jpg"], ["high"])
    assert path.read_bytes() == raw  # a failed write leaves the old file intact


def test_probs_must_match_test_list(tmp_path):
    write_probs(tmp_path / "p.csv", ["a.jpg", "b.jpg"], P1[:2])
    np.testing.assert_allclose(aligned_probs(tmp_path / "p.csv", ["a.jpg", "b.jpg"]), P1[:2], atol=1e-6)
    with pytest.raises(DataError, match="different order"):
        aligned_probs(tmp_path / "p.csv", ["b.jpg", "a.jpg"])
    with pytest.raises(DataError, match="missing c.jpg"):
        aligned_probs(tmp_path / "p.csv", ["a.jpg", "b.jpg", "c.jpg"])


def test_predict_end_to_end_on_files(tmp_path, images):
    folder, names = images
    names = names[:3]
    (tmp_path / "B.txt").write_text("".join(f"{n}\t{g}\n" for n, g in zip(names, ["中风险", "无风险", "高风险"])),
                                    encoding="utf-8")
    out = Layout(tmp_path / "out")
    out.data_dir.mkdir(parents=True)
    out.manifest.write_text(f'{{"test_list": "{tmp_path / "B.txt"}", "test_images": "{folder}"}}', encoding="utf-8")
    write_probs(out.run_dir("stage1") / "test_probs.csv", names, P1)
    stage2 = np.zeros((3, 5))
    stage2[:, 0] = [0.9, 0.9, 0.1]
    stage2[:, 1] = 1 - stage2[:, 0]
    write_probs(out.run_dir("stage2") / "test_probs.csv", names, stage2)
    result = predict(out.root, quiet=True)
    lines = out.submission.read_text(encoding="utf-8").splitlines()
    assert lines == [f"{names[0]}\t高风险", f"{names[1]}\t无风险", f"{names[2]}\t中风险"]
    assert result["stage1"].weighted_f1 == pytest.approx(2.0 + 1.5 + 1.0)  # all three right
    assert result["fused"].f1[0] == 0.0  # fusion flipped both 高 decisions wrongly here
    header = out.probabilities.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[0] == "image" and header[-1] == "label" and len(header) == 1 + 15 + 1
