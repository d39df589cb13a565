"""Probability files, one writer and one reader each.

  <stage>/<part>_probs.csv   image, then one probability column per label (tools.model.score writes it)
  probabilities.csv          image, stage-1, stage-2 and fused vectors, the chosen label (tools.decide.fuse)

Readers check the header, the numbers and that no image appears twice, and name the file and line.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from tools.fileio import DataError, atomic_open
from tools.task import LABELS

PROBS_HEADER = ["image", *LABELS]
PROBABILITIES_HEADER = ["image", *(f"{stage}_{label}" for stage in ("stage1", "stage2", "fused") for label in LABELS),
                        "label"]


def write_probs(path: str | Path, names: Sequence[str], probs: np.ndarray) -> None:
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PROBS_HEADER)
        for name, p in zip(names, probs):
            w.writerow([name, *(f"{v:.6f}" for v in p)])


def _rows(path: Path, header: list[str], hint: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: not found ({hint})") from None
    if not rows or rows[0] != header:
        raise DataError(f"{path}:1: expected header {','.join(header)}")
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        if row[0] in seen:
            raise DataError(f"{path}:{lineno}: {row[0]} already on line {seen[row[0]]}")
        seen[row[0]] = lineno
    return rows[1:]


def _numbers(path: Path, rows: list[list[str]], columns: slice) -> np.ndarray:
    values = []
    for lineno, row in enumerate(rows, 2):
        try:
            values.append([float(v) for v in row[columns]])
        except ValueError:
            raise DataError(f"{path}:{lineno}: a probability is not a number") from None
    if not values:  # a header-only file: no images
        return np.zeros((0, len(LABELS)))
    return np.array(values, dtype=np.float64)


def read_probs(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(image names, [N, 5] probabilities) of a <part>_probs.csv."""
    path = Path(path)
    rows = _rows(path, PROBS_HEADER, "test.sh scores it")
    return [r[0] for r in rows], _numbers(path, rows, slice(1, None))


def aligned_probs(path: str | Path, names: Sequence[str], what: str = "the test list") -> np.ndarray:
    """The probability rows of `path`, which must name exactly `names`, in that order."""
    got, probs = read_probs(path)
    if got != list(names):
        missing = sorted(set(names) - set(got))
        extra = sorted(set(got) - set(names))
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else "different order")
        raise DataError(f"{path}: does not match {what} ({len(got)} rows vs {len(names)}; {detail})")
    return probs


def write_probabilities(path: str | Path, names: Sequence[str], p1: np.ndarray, p2: np.ndarray, fused: np.ndarray,
                        labels: Sequence[str]) -> None:
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PROBABILITIES_HEADER)
        for i, name in enumerate(names):
            w.writerow([name, *(f"{v:.6f}" for v in (*p1[i], *p2[i], *fused[i])), labels[i]])


def read_probabilities(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, p1, p2, fused) of probabilities.csv."""
    path = Path(path)
    rows = _rows(path, PROBABILITIES_HEADER, "run tools.decide.fuse first")
    if not rows:
        raise DataError(f"{path}: no rows")
    a = _numbers(path, rows, slice(1, -1)).reshape(len(rows), 3, len(LABELS))
    return [r[0] for r in rows], a[:, 0], a[:, 1], a[:, 2]
