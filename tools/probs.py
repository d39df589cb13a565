"""Probability files, one writer and one reader each.

  <stage>/<part>_probs.csv   image, then one probability column per label of the stage's target: the five
                             labels, or 高风险 and 非高风险 for a binary specialist (tools.model.score writes it)
  probabilities.csv          image, stage 1's vector, stage 2's p(高风险), the fused vector and the chosen label
                             (tools.decide.fuse)

Readers check the header, the numbers and that no image appears twice, and name the file and line.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from tools.fileio import DataError, atomic_open
from tools.task import HIGH_RISK, LABELS, TARGETS

PROBS_HEADERS = {len(labels): ["image", *labels] for labels, _ in TARGETS.values()}  # by number of columns
PROBABILITIES_HEADER = ["image", *(f"stage1_{label}" for label in LABELS), f"stage2_{HIGH_RISK}",
                        *(f"fused_{label}" for label in LABELS), "label"]


def write_probs(path: str | Path, names: Sequence[str], probs: np.ndarray) -> None:
    """probs [N, 5] (the five labels) or [N, 2] (高风险, 非高风险)."""
    probs = np.asarray(probs)
    header = PROBS_HEADERS.get(probs.shape[1] if probs.ndim == 2 else len(LABELS))
    if header is None:
        raise ValueError(f"{path}: {probs.shape[1]} probability columns: expected five labels or two")
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for name, p in zip(names, probs):
            w.writerow([name, *(f"{v:.6f}" for v in p)])


def _rows(path: Path, headers: list[list[str]], hint: str) -> tuple[list[str], list[list[str]]]:
    """(the header, the data rows) of a probability CSV whose header is one of `headers`; checks each row."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: not found ({hint})") from None
    if not rows or rows[0] not in headers:
        raise DataError(f"{path}:1: expected header {' or '.join(','.join(h) for h in headers)}")
    header = rows[0]
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        if row[0] in seen:
            raise DataError(f"{path}:{lineno}: {row[0]} already on line {seen[row[0]]}")
        seen[row[0]] = lineno
    return header, rows[1:]


def _numbers(path: Path, rows: list[list[str]], columns: slice, width: int) -> np.ndarray:
    values = []
    for lineno, row in enumerate(rows, 2):
        try:
            values.append([float(v) for v in row[columns]])
        except ValueError:
            raise DataError(f"{path}:{lineno}: a probability is not a number") from None
    if not values:  # a header-only file: no images
        return np.zeros((0, width))
    return np.array(values, dtype=np.float64)


def read_probs(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(image names, [N, 5] or [N, 2] probabilities) of a <part>_probs.csv; column 0 is 高风险 either way."""
    path = Path(path)
    header, rows = _rows(path, list(PROBS_HEADERS.values()), "test.sh scores it")
    return [r[0] for r in rows], _numbers(path, rows, slice(1, None), len(header) - 1)


def aligned_probs(path: str | Path, names: Sequence[str], what: str = "the test list") -> np.ndarray:
    """The probability rows of `path`, which must name exactly `names`, in that order."""
    got, probs = read_probs(path)
    if got != list(names):
        missing = sorted(set(names) - set(got))
        extra = sorted(set(got) - set(names))
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else "different order")
        raise DataError(f"{path}: does not match {what} ({len(got)} rows vs {len(names)}; {detail})")
    return probs


def write_probabilities(path: str | Path, names: Sequence[str], p1: np.ndarray, p2_high: np.ndarray,
                        fused: np.ndarray, labels: Sequence[str]) -> None:
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PROBABILITIES_HEADER)
        for i, name in enumerate(names):
            w.writerow([name, *(f"{v:.6f}" for v in (*p1[i], p2_high[i], *fused[i])), labels[i]])


def read_probabilities(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, p1 [N, 5], p2_high [N], fused [N, 5]) of probabilities.csv."""
    path = Path(path)
    _, rows = _rows(path, [PROBABILITIES_HEADER], "run tools.decide.fuse first")
    if not rows:
        raise DataError(f"{path}: no rows")
    a = _numbers(path, rows, slice(1, -1), 2 * len(LABELS) + 1)
    n = len(LABELS)
    return [r[0] for r in rows], a[:, :n], a[:, n], a[:, n + 1:]
