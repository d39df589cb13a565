"""Stratified splits: the train/validation split and the fold dealer (one for the k-fold runs and the fusion
search's cross-validation). Seeded; every part keeps the input order."""
from __future__ import annotations

import argparse

import numpy as np

from tools.data.lists import Sample, class_counts
from tools.fileio import DataError
from tools.task import LABELS


def stratified_split(samples: list[Sample], val_ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per label, a seeded shuffle puts round(n * val_ratio) images in validation (at least one when the
    label has two or more images and val_ratio > 0). Both parts keep the input order."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    rng = np.random.default_rng(seed)
    val_names: set[str] = set()
    for label in LABELS:
        names = [s.name for s in samples if s.label == label]
        n_val = round(len(names) * val_ratio)
        if val_ratio > 0 and len(names) >= 2:
            n_val = min(max(n_val, 1), len(names) - 1)
        val_names.update(rng.permutation(names)[:n_val].tolist())
    return [s for s in samples if s.name not in val_names], [s for s in samples if s.name in val_names]


def stratified_folds(gold: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """fold[i] in 0..k-1 for label indices `gold`: each class is shuffled and dealt round-robin, continuing
    where the last class stopped (per-class and total fold sizes differ by at most one)."""
    gold = np.asarray(gold, dtype=int)
    fold = np.empty(len(gold), dtype=int)
    start = 0
    for c in range(len(LABELS)):
        idx = rng.permutation(np.flatnonzero(gold == c))
        fold[idx] = (start + np.arange(len(idx))) % k
        start = (start + len(idx)) % k
    return fold


def deal_folds(fit: list[Sample], k: int, seed: int) -> list[list[Sample]]:
    """The held-out part of each of k folds of the training split: every image in exactly one. Its own random
    stream, so the split and the stage sets are the same with or without folds."""
    fold = stratified_folds(np.array([s.label_index for s in fit], dtype=int), k, np.random.default_rng([seed, 4]))
    return [[s for s, f in zip(fit, fold) if f == i] for i in range(k)]


def parse_folds(text: str) -> int:
    """--folds / FOLDS: a whole number >= 1."""
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1 or str(k) != text.strip():
        raise argparse.ArgumentTypeError(f"FOLDS (--folds) must be a whole number >= 1 (1 = no folds), got {text!r}")
    return k


def check_folds(k: int, fit: list[Sample]) -> None:
    """k folds need at least k images of every label in the training split: then every fold holds out, and
    trains on, at least one image of each label (a fold without 高风险 to train on is no model of the task)."""
    if k < 1:
        raise DataError(f"FOLDS (--folds) must be at least 1 (1 = no folds), got {k}")
    if k == 1:
        return
    counts = {label: n for label, n in class_counts(fit).items() if n > 0}
    if not counts:
        raise DataError(f"FOLDS={k} (--folds): the training split is empty")
    label, n = min(counts.items(), key=lambda kv: kv[1])
    if n < k:
        raise DataError(f"FOLDS={k} (--folds): the training split has only {n} {label} image(s); every fold must "
                        f"hold out and train on each label, so FOLDS can be at most {n}")
