"""tools.decide.fuse: both stages' test probabilities (tools.probs CSVs) fused into the submission and
probabilities.csv, in the test list's order, with the fusion parameters test.sh chose."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import random_probs, write_image
from tools.decide.fuse import fuse_test, main
from tools.decide.fusion import FusionParams, fuse
from tools.fileio import DataError, write_json, write_text
from tools.probs import read_probabilities, read_probs, write_probs
from tools.task import HIGH_RISK_INDEX, LABELS, Layout

P1 = np.array([[0.30, 0.40, 0.10, 0.15, 0.05],   # stage 1 says 中, close to 高
               [0.05, 0.05, 0.10, 0.75, 0.05],   # clearly 无
               [0.45, 0.35, 0.10, 0.05, 0.05]])  # says 高


TRAIN_COUNTS = dict(zip(LABELS, (1, 2, 3, 6, 0)))  # the training split's labels: 无风险 the most common


def pipeline_output(tmp_path, names, gold=None, bad=None) -> Layout:
    """An output folder as data-pre.sh leaves it for fusion: the checked test list and the manifest (the prepared
    test images, the training split's counts, the unreadable test images `bad`, {name: reason})."""
    layout = Layout(tmp_path / "out")
    folder = layout.prepared_images("test")
    for name in names:
        if name not in (bad or {}):
            write_image(folder / name)
    write_text(layout.test_list, "".join(f"{n}\t{g}\n" if gold else f"{n}\n" for n, g in zip(names, gold or names)))
    write_json(layout.manifest, {"test_list": str(tmp_path / "B.txt"), "test_images": str(folder),
                                 "source_test_images": str(tmp_path / "B"), "bad_test_images": bad or {},
                                 "test_labelled": bool(gold), "folds": 1, "counts": {"train": TRAIN_COUNTS}})
    return layout


def stage2_of(p_high: np.ndarray) -> np.ndarray:
    p2 = np.zeros((len(p_high), 5))
    p2[:, HIGH_RISK_INDEX] = p_high
    p2[:, 1] = 1 - p_high
    return p2


def test_predict_end_to_end_on_files(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg"]
    out = pipeline_output(tmp_path, names, ["中风险", "无风险", "高风险"])
    write_probs(out.probs("stage1", "test"), names, P1)
    write_probs(out.probs("stage2", "test"), names, stage2_of(np.array([0.9, 0.9, 0.1])))
    result = fuse_test(out.root, quiet=True)
    lines = out.submission.read_text(encoding="utf-8").splitlines()
    assert lines == [f"{names[0]}\t高风险", f"{names[1]}\t无风险", f"{names[2]}\t中风险"]
    assert result["stage1"].weighted_f1 == pytest.approx(2.0 + 1.5 + 1.0)  # all three right
    assert result["fused"].f1[0] == 0.0  # fusion flipped both 高 decisions wrongly here
    assert result["fusion"] == FusionParams() and result["n"] == 3  # no fusion.json: beta 1, no offsets
    header = out.probabilities.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[0] == "image" and header[-1] == "label" and len(header) == 1 + 5 + 1 + 5 + 1  # stage 2: p(高风险)


@pytest.fixture
def scored(tmp_path):
    """Twelve test images listed out of name order, both stages' random probabilities in that order."""
    names = [f"{c}.jpg" for c in "kbxaqmzcyfel"]
    out = pipeline_output(tmp_path, names)
    write_probs(out.probs("stage1", "test"), names, random_probs(12, 1))
    write_probs(out.probs("stage2", "test"), names, random_probs(12, 2))
    # as written (6 decimals): what fusion reads
    return out, names, read_probs(out.probs("stage1", "test"))[1], read_probs(out.probs("stage2", "test"))[1]


def submitted(layout: Layout) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")) for line in layout.submission.read_text(encoding="utf-8").splitlines()]


def test_submission_follows_the_test_list_with_the_fused_argmax(scored, capsys):
    out, names, p1, p2 = scored
    assert main(["--output-dir", str(out.root)]) == 0
    fused = fuse(p1, p2[:, HIGH_RISK_INDEX], FusionParams())
    assert submitted(out) == [(n, LABELS[i]) for n, i in zip(names, fused.argmax(1))]
    got_names, g1, g2, gf = read_probabilities(out.probabilities)
    assert got_names == names
    for block, want in ((g1, p1), (gf, fused)):
        np.testing.assert_allclose(block, want, atol=1e-6)
        np.testing.assert_allclose(block.sum(1), 1, atol=1e-5)  # each a distribution over the five labels
    np.testing.assert_allclose(g2, p2[:, HIGH_RISK_INDEX], atol=1e-6)  # stage 2's: what fusion uses
    labels = [line.rsplit(",", 1)[1] for line in out.probabilities.read_text(encoding="utf-8").splitlines()[1:]]
    assert labels == [label for _, label in submitted(out)]
    text = capsys.readouterr().out
    assert "(default)" in text and "stage 1 alone" not in text  # an unlabelled test list: no scores


def test_fusion_json_is_used_and_fusion_params_override_it(scored, tmp_path):
    out, names, p1, p2 = scored
    to_not_corridor = FusionParams(beta=0.0, offsets=[0, 0, 0, 0, 20.0])
    to_low = FusionParams(beta=0.0, offsets=[0, 0, 20.0, 0, 0])
    to_not_corridor.save(out.fusion_params)
    result = fuse_test(out.root, quiet=True)
    assert result["fusion"] == to_not_corridor and {label for _, label in submitted(out)} == {"非楼道"}
    to_low.save(tmp_path / "other.json")
    assert main(["--output-dir", str(out.root), "--fusion-params", str(tmp_path / "other.json")]) == 0
    assert {label for _, label in submitted(out)} == {"低风险"}
    np.testing.assert_allclose(read_probabilities(out.probabilities)[3],
                               fuse(p1, p2[:, HIGH_RISK_INDEX], to_low), atol=1e-6)
    out.fusion_params.unlink()
    fuse_test(out.root, FusionParams.identity().save(tmp_path / "id.json") or tmp_path / "id.json", quiet=True)
    assert submitted(out) == [(n, LABELS[i]) for n, i in zip(names, p1.argmax(1))]  # identity: stage 1 alone


@pytest.mark.parametrize("stage, rows, detail", [
    ("stage2", slice(1, None), "missing k.jpg"),
    ("stage1", slice(None, None, -1), "different order"),
])
def test_a_csv_that_does_not_match_the_test_list_is_refused(scored, capsys, stage, rows, detail):
    out, names, p1, _ = scored
    path = out.probs(stage, "test")
    write_probs(path, names[rows], p1[rows])
    with pytest.raises(DataError, match=rf"{path}: does not match the readable test images \(\d+ rows vs 12; "
                                        rf"({detail})"):
        fuse_test(out.root, quiet=True)
    assert main(["--output-dir", str(out.root)]) == 1
    assert str(path) in capsys.readouterr().err
    assert not out.submission.exists() and not out.probabilities.exists()  # nothing written


def test_an_extra_row_and_a_missing_step_are_refused(scored, capsys):
    out, names, p1, _ = scored
    write_probs(out.probs("stage1", "test"), names + ["zz.jpg"], np.vstack([p1, p1[:1]]))
    with pytest.raises(DataError, match="13 rows vs 12; unexpected zz.jpg"):
        fuse_test(out.root, quiet=True)
    out.probs("stage2", "test").unlink()
    write_probs(out.probs("stage1", "test"), names, p1)
    with pytest.raises(DataError, match=r"stage2/test_probs.csv: not found"):
        fuse_test(out.root, quiet=True)
    out.manifest.unlink()
    assert main(["--output-dir", str(out.root)]) == 1
    assert "manifest.json: not found: run data-pre.sh first" in capsys.readouterr().err


def test_an_unreadable_test_image_gets_the_training_shares_and_no_row_in_the_csvs(tmp_path, capsys):
    """data-pre.sh could not read b.jpg (manifest.json's bad_test_images): the scored CSVs cover the readable images
    only, and b.jpg is submitted all the same, in its place, with the training split's shares as probabilities."""
    names = ["a.jpg", "b.jpg", "c.jpg"]
    out = pipeline_output(tmp_path, names, bad={"b.jpg": "unreadable image (UnidentifiedImageError)"})
    for stage in ("stage1", "stage2"):
        write_probs(out.probs(stage, "test"), names, P1)  # a row for b.jpg: not what scoring writes
    with pytest.raises(DataError, match=r"does not match the readable test images \(3 rows vs 2; unexpected b.jpg\)"):
        fuse_test(out.root, quiet=True)
    assert not out.submission.exists()
    readable = [0, 2]
    write_probs(out.probs("stage1", "test"), ["a.jpg", "c.jpg"], P1[readable])
    write_probs(out.probs("stage2", "test"), ["a.jpg", "c.jpg"], stage2_of(np.array([0.1, 0.9])))
    assert fuse_test(out.root, quiet=True)["n"] == 3
    fused = fuse(P1[readable], np.array([0.1, 0.9]), FusionParams())
    assert submitted(out) == [("a.jpg", LABELS[fused[0].argmax()]), ("b.jpg", "无风险"),
                              ("c.jpg", LABELS[fused[1].argmax()])]
    got_names, g1, g2, gf = read_probabilities(out.probabilities)
    shares = np.array([TRAIN_COUNTS[label] for label in LABELS]) / sum(TRAIN_COUNTS.values())
    assert got_names == names
    for block in (g1, gf):
        np.testing.assert_allclose(block[1], shares, atol=1e-6)
    assert g2[1] == pytest.approx(shares[HIGH_RISK_INDEX], abs=1e-6)
    np.testing.assert_allclose(gf[readable], fused, atol=1e-6)
    assert "warning: b.jpg: unreadable (unreadable image (UnidentifiedImageError)): fallback label 无风险" in \
        capsys.readouterr().err
