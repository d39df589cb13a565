"""tools.data.split: the stratified train/validation split, the one fold dealer (k-fold runs and the fusion search's
cross-validation), and the FOLDS knob's checks."""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import pytest

from tests.helpers import SHARES, fake_samples
from tools.data.split import check_folds, deal_folds, parse_folds, stratified_folds, stratified_split
from tools.fileio import DataError


# --------------------------------------------------------------------------- the train/validation split
def test_split_is_stratified_disjoint_and_seeded():
    samples = fake_samples()
    fit, val = stratified_split(samples, 0.2, seed=1)
    assert {s.name for s in fit}.isdisjoint({s.name for s in val})
    assert len(fit) + len(val) == len(samples)
    counts = Counter(s.label for s in val)
    assert counts == {"高风险": 1, "中风险": 4, "低风险": 3, "无风险": 10, "非楼道": 1}  # round(n·0.2), ≥ 1
    again, _ = stratified_split(samples, 0.2, seed=1)
    other, _ = stratified_split(samples, 0.2, seed=2)
    assert [s.name for s in again] == [s.name for s in fit]
    assert [s.name for s in other] != [s.name for s in fit]
    order = {s.name: i for i, s in enumerate(samples)}  # both parts keep the input order
    for part in (fit, val):
        assert [order[s.name] for s in part] == sorted(order[s.name] for s in part)


def test_split_without_validation_keeps_everything():
    fit, val = stratified_split(fake_samples(), 0.0, seed=0)
    assert val == [] and len(fit) == sum(SHARES.values())


def test_split_holds_out_at_least_one_and_keeps_at_least_one():
    # a label with two or more images: at least one held out, at least one left to train on, whatever the ratio
    fit, val = stratified_split(fake_samples({"高风险": 2, "中风险": 10}), 0.9, seed=0)
    assert Counter(s.label for s in val) == {"高风险": 1, "中风险": 9}
    assert Counter(s.label for s in fit) == {"高风险": 1, "中风险": 1}
    fit, val = stratified_split(fake_samples({"高风险": 2, "中风险": 10}), 0.01, seed=0)
    assert Counter(s.label for s in val) == {"高风险": 1, "中风险": 1}


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_split_refuses_a_ratio_outside_0_1(ratio):
    with pytest.raises(ValueError, match="val_ratio"):
        stratified_split(fake_samples(), ratio, seed=0)


# --------------------------------------------------------------------------- the fold dealer
def test_stratified_folds_spread_every_class():
    gold = np.repeat(np.arange(5), [10, 7, 5, 23, 3])
    fold = stratified_folds(gold, 5, np.random.default_rng(0))
    assert set(fold) == set(range(5))
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1  # dealing continues across classes, so folds stay balanced
    for c in range(5):
        per_fold = np.bincount(fold[gold == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1


def test_stratified_folds_follow_the_generator():
    gold = np.repeat(np.arange(5), [10, 7, 5, 23, 3])
    a = stratified_folds(gold, 3, np.random.default_rng(1))
    assert (stratified_folds(gold, 3, np.random.default_rng(1)) == a).all()
    assert (stratified_folds(gold, 3, np.random.default_rng(2)) != a).any()


def test_fold_partition_is_stratified_and_seeded():
    samples = fake_samples()
    folds = deal_folds(samples, 3, seed=7)
    assert len(folds) == 3
    names = [s.name for fold in folds for s in fold]
    assert sorted(names) == sorted(s.name for s in samples)  # every image in exactly one fold
    for label, n in SHARES.items():  # per label, fold sizes differ by at most one
        per_fold = [sum(s.label == label for s in fold) for fold in folds]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 1
    order = {s.name: i for i, s in enumerate(samples)}
    assert all([order[s.name] for s in fold] == sorted(order[s.name] for s in fold) for fold in folds)
    assert deal_folds(samples, 3, seed=7) == folds
    assert [[s.name for s in f] for f in deal_folds(samples, 3, seed=8)] != [[s.name for s in f] for f in folds]


# --------------------------------------------------------------------------- the FOLDS knob
def test_folds_knob_is_checked():
    samples = fake_samples()  # the rarest label, 非楼道, has 3 images
    check_folds(1, samples)
    check_folds(3, samples)
    with pytest.raises(DataError, match=r"FOLDS=4 \(--folds\): .* only 3 非楼道 image\(s\).* at most 3"):
        check_folds(4, samples)
    with pytest.raises(DataError, match=r"FOLDS \(--folds\) must be at least 1"):
        check_folds(0, samples)
    with pytest.raises(DataError, match=r"FOLDS=2 \(--folds\): the training split is empty"):
        check_folds(2, [])
    check_folds(1, [])  # no folds: nothing to check


@pytest.mark.parametrize("text, k", [("1", 1), ("3", 3), (" 2 ", 2)])
def test_parse_folds_accepts_whole_numbers(text, k):
    assert parse_folds(text) == k


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", "", "02"])
def test_parse_folds_refuses_naming_the_knob(bad):
    with pytest.raises(argparse.ArgumentTypeError, match=r"FOLDS \(--folds\) must be a whole number >= 1"):
        parse_folds(bad)
