"""tools.decide.validate: a good file passes; each malformed case fails naming its first bad line."""
from __future__ import annotations

import pytest

from tools.decide.submission import write_submission
from tools.decide.validate import SubmissionError, check_submission, main

NAMES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
GOOD = "a.jpg\t高风险\nb.jpg\t中风险\nc.jpg\t无风险\nd.jpg\t非楼道\n"


def test_good_file_passes():
    assert check_submission(GOOD.encode("utf-8"), NAMES) == 4


def test_writer_output_passes(tmp_path, capsys):
    """What tools.decide.submission writes is what the validator accepts; a labelled test list is fine."""
    write_submission(tmp_path / "b-submit.txt", NAMES, ["高风险", "低风险", "无风险", "无风险"])
    (tmp_path / "B.txt").write_text("a.jpg\t中风险\nb.jpg\t中风险\nc.jpg\t无风险\nd.jpg\t无风险\n", encoding="utf-8")
    assert main([str(tmp_path / "b-submit.txt"), "--test-list", str(tmp_path / "B.txt")]) == 0
    assert capsys.readouterr().out.strip() == "OK: 4 images"


BAD = {  # case: (file bytes, the message must contain this, which names the line of the first problem)
    "bom": ("\ufeff" + GOOD, "sub:1: starts with a UTF-8 BOM"),
    "missing image": ("a.jpg\t高风险\nc.jpg\t无风险\nd.jpg\t非楼道\n", "sub:2: b.jpg is missing"),
    "missing last image": ("a.jpg\t高风险\nb.jpg\t中风险\nc.jpg\t无风险\n", "sub:4: file ends after 3 lines; d.jpg is missing"),
    "duplicate": ("a.jpg\t高风险\nb.jpg\t中风险\nb.jpg\t中风险\nd.jpg\t非楼道\n", "sub:3: b.jpg appears again (first on line 2)"),
    "wrong order": ("a.jpg\t高风险\nc.jpg\t无风险\nb.jpg\t中风险\nd.jpg\t非楼道\n", "sub:2: wrong order: expected b.jpg"),
    "bad label": (GOOD.replace("无风险", "no risk"), "sub:3: unknown label 'no risk'"),
    "three fields": (GOOD.replace("b.jpg\t中风险", "b.jpg\t中风险\t0.9"), "sub:2: expected 2 tab-separated fields (image, label), got 3"),
    "space not tab": (GOOD.replace("c.jpg\t", "c.jpg "), "sub:3: expected 2 tab-separated fields (image, label), got 1; fields must be separated by a tab"),
    "no trailing newline": (GOOD[:-1], "sub:4: no newline at the end of the file"),
    "crlf": (GOOD.replace("\n", "\r\n"), "sub:1: a CRLF line end"),
    "blank line": (GOOD.replace("c.jpg", "\nc.jpg"), "sub:3: blank line"),
    "trailing blank line": (GOOD + "\n", "sub:5: blank line"),
    "extra image": (GOOD + "e.jpg\t无风险\n", "sub:5: e.jpg is not in the test list"),
    "blank around field": (GOOD.replace("\t中风险", "\t中风险 "), "sub:2: blanks around a field"),
    "empty": ("", "sub:1: empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_malformed_case_is_rejected_naming_its_line(case):
    content, message = BAD[case]
    with pytest.raises(SubmissionError) as e:
        check_submission(content.encode("utf-8"), NAMES, "sub")
    assert message in str(e.value)


def test_first_problem_wins():
    # line 2 has a bad label, line 3 a CRLF: the report is about line 2
    content = "a.jpg\t高风险\nb.jpg\tmid\nc.jpg\t无风险\r\nd.jpg\t非楼道\n"
    with pytest.raises(SubmissionError, match=r"^sub:2: unknown label"):
        check_submission(content.encode("utf-8"), NAMES, "sub")


def test_invalid_utf8_names_its_line():
    raw = GOOD.encode("utf-8").replace("无风险".encode("utf-8"), b"\xff\xfe")
    with pytest.raises(SubmissionError, match=r"^sub:3: not valid UTF-8"):
        check_submission(raw, NAMES, "sub")


def test_cli_exit_1_with_message(tmp_path, capsys):
    (tmp_path / "B.txt").write_text("\n".join(NAMES) + "\n", encoding="utf-8")  # unlabelled list
    sub = tmp_path / "b-submit.txt"
    sub.write_bytes(GOOD.replace("b.jpg", "x.jpg").encode("utf-8"))
    assert main([str(sub), "--test-list", str(tmp_path / "B.txt")]) == 1
    assert f"{sub}:2: x.jpg is not in the test list" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.txt"), "--test-list", str(tmp_path / "B.txt")]) == 1
    assert "file not found" in capsys.readouterr().err
    (tmp_path / "B.txt").write_text("a.jpg\tnot-a-label\n", encoding="utf-8")  # a broken test list is reported too
    assert main([str(sub), "--test-list", str(tmp_path / "B.txt")]) == 1
    assert "B.txt:1: unknown label" in capsys.readouterr().err
