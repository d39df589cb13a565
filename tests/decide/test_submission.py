"""tools.decide.submission: the submission file's exact bytes, and what the writer refuses."""
from __future__ import annotations

import pytest

from tools.decide.submission import write_submission


def test_submission_format(tmp_path):
    path = tmp_path / "b-submit.txt"
    write_submission(path, ["b.jpg", "a.jpg"], ["高风险", "非楼道"])
    raw = path.read_bytes()
    assert raw == "b.jpg\t高风险\na.jpg\t非楼道\n".encode("utf-8")  # list order, no BOM, no header
    with pytest.raises(ValueError, match="more than once"):
        write_submission(path, ["a.jpg", "a.jpg"], ["高风险", "高风险"])
    with pytest.raises(ValueError, match="not a label"):
        write_submission(path, ["a.jpg"], ["high"])
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        write_submission(path, ["a.jpg", "b.jpg"], ["高风险"])
    assert path.read_bytes() == raw  # a failed write leaves the old file intact
    assert not list(tmp_path.glob(".*.tmp"))
