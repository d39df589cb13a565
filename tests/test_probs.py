"""tools.probs: the probability CSVs' one writer and one reader each, and what the readers refuse (file:line)."""
from __future__ import annotations

import numpy as np
import pytest

from tools.fileio import DataError
from tools.probs import (PROBABILITIES_HEADER, PROBS_HEADERS, aligned_probs, read_probabilities, read_probs,
                         write_probabilities, write_probs)
from tools.task import BINARY_LABELS, HIGH_RISK, LABELS

PROBS_HEADER = PROBS_HEADERS[len(LABELS)]  # a five-label stage's

P1 = np.array([[0.30, 0.40, 0.10, 0.15, 0.05],
               [0.05, 0.05, 0.10, 0.75, 0.05],
               [0.45, 0.35, 0.10, 0.05, 0.05]])


def test_probs_round_trip(tmp_path):
    path = tmp_path / "stage1" / "test_probs.csv"
    write_probs(path, ["a.jpg", "b.jpg", "c.jpg"], P1 + 1e-8)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(PROBS_HEADER) == "image," + ",".join(LABELS)
    assert lines[1] == "a.jpg,0.300000,0.400000,0.100000,0.150000,0.050000"  # six decimals
    names, probs = read_probs(path)
    assert names == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_allclose(probs, P1, atol=1e-6)
    # a binary specialist's (STAGE2_TARGET=binary): 高风险 and 非高风险, 高风险 in column 0 either way
    binary = np.stack([P1[:, 0], 1 - P1[:, 0]], axis=1)
    write_probs(path, ["a.jpg", "b.jpg", "c.jpg"], binary)
    assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(["image", *BINARY_LABELS])
    assert BINARY_LABELS[0] == HIGH_RISK
    np.testing.assert_allclose(read_probs(path)[1], binary, atol=1e-6)
    with pytest.raises(ValueError, match="3 probability columns: expected five labels or two"):
        write_probs(path, ["a.jpg", "b.jpg", "c.jpg"], P1[:, :3])


def test_an_empty_probs_file_reads_as_no_rows(tmp_path):
    """tools.model.score writes a header-only CSV for an empty dataset (an empty validation split): it reads back."""
    write_probs(tmp_path / "empty.csv", [], np.zeros((0, 5)))
    assert (tmp_path / "empty.csv").read_text(encoding="utf-8") == ",".join(PROBS_HEADER) + "\n"
    names, probs = read_probs(tmp_path / "empty.csv")
    assert names == [] and probs.shape == (0, 5)


@pytest.mark.parametrize("text, message", [
    ("image,a,b,c,d,e\nx.jpg,1,0,0,0,0\n", r"p.csv:1: expected header image,高风险,中风险,低风险,无风险,非楼道"),
    ("", r"p.csv:1: expected header"),
    ("HEADER\nx.jpg,0.2,0.2,zero,0.2,0.2\n", r"p.csv:2: a probability is not a number"),
    ("HEADER\nx.jpg,0.2,0.2,0.2,0.2,0.2\ny.jpg,1,0,0,0,0\nx.jpg,1,0,0,0,0\n", r"p.csv:4: x.jpg already on line 2"),
    ("HEADER\nx.jpg,0.2,0.2,0.2,0.2\n", r"p.csv:2: expected 6 fields, got 5"),
])
def test_read_probs_refusals_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text.replace("HEADER", ",".join(PROBS_HEADER)), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_probs(path)


def test_missing_file_says_which_step_writes_it(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: not found \(test.sh scores it\)"):
        read_probs(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"probabilities.csv: not found \(run tools.decide.fuse first\)"):
        read_probabilities(tmp_path / "probabilities.csv")


def test_probs_must_match_test_list(tmp_path):
    write_probs(tmp_path / "p.csv", ["a.jpg", "b.jpg"], P1[:2])
    np.testing.assert_allclose(aligned_probs(tmp_path / "p.csv", ["a.jpg", "b.jpg"]), P1[:2], atol=1e-6)
    with pytest.raises(DataError, match="different order"):
        aligned_probs(tmp_path / "p.csv", ["b.jpg", "a.jpg"])
    with pytest.raises(DataError, match="missing c.jpg"):
        aligned_probs(tmp_path / "p.csv", ["a.jpg", "b.jpg", "c.jpg"])
    with pytest.raises(DataError, match=r"p.csv: does not match the fold list \(2 rows vs 1; unexpected b.jpg\)"):
        aligned_probs(tmp_path / "p.csv", ["a.jpg"], what="the fold list")
    with pytest.raises(DataError, match=r"p.csv: does not match the test list \(2 rows vs 2; missing c.jpg\)"):
        aligned_probs(tmp_path / "p.csv", ["a.jpg", "c.jpg"])


def test_probabilities_round_trip(tmp_path):
    """probabilities.csv: stage 1's vector, stage 2's p(高风险) (what fusion uses, whatever its target), the fused
    vector and the label."""
    path = tmp_path / "probabilities.csv"
    p2, fused = P1[::-1, 0], np.full((3, 5), 0.2)
    write_probabilities(path, ["a.jpg", "b.jpg", "c.jpg"], P1, p2, fused, ["中风险", "无风险", "高风险"])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(PROBABILITIES_HEADER) and len(PROBABILITIES_HEADER) == 1 + 5 + 1 + 5 + 1
    assert PROBABILITIES_HEADER[6] == f"stage2_{HIGH_RISK}"
    assert lines[1].startswith("a.jpg,0.300000,") and lines[1].endswith(",中风险")
    names, g1, g2, gf = read_probabilities(path)
    assert names == ["a.jpg", "b.jpg", "c.jpg"]
    for got, want in ((g1, P1), (g2, p2), (gf, fused)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    path.write_text(lines[0] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="probabilities.csv: no rows"):
        read_probabilities(path)
    path.write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"probabilities.csv:3: a.jpg already on line 2"):
        read_probabilities(path)
