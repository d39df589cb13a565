"""Check a submission file against the test list before it is handed in.

    python -m tools.decide.validate outputs/b-submit.txt --test-list /data/ele/B.txt

Exit 0 and print "OK: N images", or exit 1 naming the line of the FIRST problem. The format is strict on
purpose (tools.data.lists tolerates sloppy input; the grader may not): UTF-8 without BOM; "\\n" line ends, no
CR; no blank lines; a newline after the last line; per line exactly two tab-separated fields, the image name
and one of tools.task.LABELS, no surrounding blanks; every test image exactly once, in the test list's order.
The test list may carry a label column, which is ignored; its images need not exist.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tools import cli
from tools.data.lists import read_list
from tools.fileio import DataError
from tools.task import LABELS

BOM = b"\xef\xbb\xbf"


class SubmissionError(ValueError):
    """The first problem in a submission; the message names the file and line."""


def check_submission(raw: bytes, expected: list[str], where: str = "submission") -> int:
    """Number of images if `raw` is a valid submission for the test images `expected` (in order); otherwise
    raise SubmissionError for the first problem, as "<where>:<line>: <what>"."""
    if raw.startswith(BOM):
        raise SubmissionError(f"{where}:1: starts with a UTF-8 BOM; write UTF-8 without BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SubmissionError(f"{where}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    if not text:
        raise SubmissionError(f"{where}:1: empty file, expected {len(expected)} lines")
    lines = text.split("\n")
    has_final_newline = lines[-1] == ""
    if has_final_newline:
        lines.pop()
    present = {}  # name -> first line it is on
    for lineno, line in enumerate(lines, 1):
        name = line.split("\t", 1)[0]
        present.setdefault(name, lineno)
    expected_at = {name: i for i, name in enumerate(expected, 1)}
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        at = f"{where}:{lineno}"
        if "\r" in line:
            kind = "a CRLF line end" if line.endswith("\r") else "a carriage return (\\r)"
            raise SubmissionError(f"{at}: {kind}; lines must end with \\n only")
        if not line.strip():
            raise SubmissionError(f"{at}: blank line")
        fields = line.split("\t")
        if len(fields) != 2:
            hint = ("; fields must be separated by a tab, not spaces" if len(fields) == 1 and " " in line
                    else "")
            raise SubmissionError(f"{at}: expected 2 tab-separated fields (image, label), got {len(fields)}{hint}")
        name, label = fields
        if name != name.strip() or label != label.strip():
            raise SubmissionError(f"{at}: blanks around a field: {line!r}")
        if label not in LABELS:
            raise SubmissionError(f"{at}: unknown label {label!r} (expected one of {', '.join(LABELS)})")
        if name in seen:
            raise SubmissionError(f"{at}: {name} appears again (first on line {seen[name]})")
        seen[name] = lineno
        if name not in expected_at:
            raise SubmissionError(f"{at}: {name} is not in the test list ({len(expected)} images)")
        want = expected[lineno - 1]
        if name != want:
            if want not in present:
                raise SubmissionError(f"{at}: {want} is missing (expected here, test list line {lineno}); got {name}")
            raise SubmissionError(f"{at}: wrong order: expected {want} (test list entry {lineno}), got {name} "
                                  f"(test list entry {expected_at[name]})")
        if lineno == len(lines) and not has_final_newline:
            raise SubmissionError(f"{at}: no newline at the end of the file")
    if len(lines) < len(expected):
        missing = expected[len(lines)]
        more = len(expected) - len(lines) - 1
        raise SubmissionError(f"{where}:{len(lines) + 1}: file ends after {len(lines)} lines; {missing} is missing"
                              + (f" (and {more} more)" if more else ""))
    return len(lines)


def validate_submission(submission: str | Path, test_list: str | Path) -> int:
    """Number of images; raises SubmissionError (the submission) or DataError (the test list)."""
    samples = read_list(test_list, ".", labelled=None, check_images=False)
    try:
        raw = Path(submission).read_bytes()
    except FileNotFoundError:
        raise SubmissionError(f"{submission}: file not found") from None
    return check_submission(raw, [s.name for s in samples], str(submission))


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.decide.validate", __doc__)
    ap.add_argument("submission", help="the submission file (b-submit.txt)")
    ap.add_argument("--test-list", required=True, help="the official test list (B.txt)")
    args = ap.parse_args(argv)
    try:
        n = validate_submission(args.submission, args.test_list)
    except (SubmissionError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"OK: {n} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
