"""tools.compose.rules: oversampling, the stage-2 set, and augmented copies in place of plain repeats."""
from __future__ import annotations

from collections import Counter

from tests.helpers import SHARES, copies_of, fake_samples
from tools.compose.rules import DEFAULT_COMPOSITION, oversample, stage1_set, stage2_set, stage_sets
from tools.task import HIGH_RISK, LABELS


def test_oversample_lifts_rare_labels_to_min_share():
    samples = fake_samples()
    rows = oversample(samples, 0.1, seed=0)
    counts = Counter(s.label for s in rows)
    for label in LABELS:
        assert counts[label] / len(rows) >= 0.1 - 1e-9 or counts[label] == SHARES[label]
    assert counts["无风险"] == 50 and counts["中风险"] == 20  # common labels untouched
    assert counts[HIGH_RISK] > SHARES[HIGH_RISK]
    assert oversample(samples, 0.0, seed=0) != samples  # shuffled, same multiset
    assert Counter(s.name for s in oversample(samples, 0.0, seed=0)) == Counter(s.name for s in samples)


def test_oversample_repeats_whole_copies_first():
    samples = fake_samples()
    rows = oversample(samples, 0.1, seed=0)
    per_image = Counter(s.name for s in rows if s.label == HIGH_RISK)
    assert set(per_image) == {s.name for s in samples if s.label == HIGH_RISK}  # every original at least once
    assert max(per_image.values()) - min(per_image.values()) <= 1  # then evenly: no image repeated twice as often
    assert oversample(samples, 0.1, seed=0) == rows and oversample(samples, 0.1, seed=1) != rows  # seeded


def test_stage2_set_composition():
    rows = stage2_set(fake_samples(), high_repeat=3, other_ratio=2.0, seed=0)
    counts = Counter(s.label for s in rows)
    assert counts[HIGH_RISK] == 18 and counts["中风险"] == 20
    assert counts["低风险"] + counts["无风险"] + counts["非楼道"] == 12


def test_without_copies_the_stage_sets_are_unchanged():
    samples = fake_samples()
    assert stage1_set(samples, 0.1, seed=3) == oversample(samples, 0.1, seed=3)
    assert stage1_set(samples, 0.1, seed=3, augmented=[]) == oversample(samples, 0.1, seed=3)
    before = stage2_set(samples, 3, 2.0, seed=3)
    assert stage2_set(samples, 3, 2.0, seed=3, augmented=copies_of(samples, "中风险", 5)) == before  # no 高风险 copy


def test_copies_replace_plain_repeats():
    samples = fake_samples()
    high = copies_of(samples, HIGH_RISK, 40) + copies_of(samples, "无风险", 12, new_label=HIGH_RISK)  # inserted
    other = copies_of(samples, "非楼道", 20)
    rows = stage1_set(samples, 0.1, seed=0, augmented=high + other)
    counts = Counter(s.label for s in rows)
    # every copy once, every original once: the copies lift 高风险 and 非楼道 over 10 %, so no repeats there
    assert counts[HIGH_RISK] == 6 + 52 and counts["非楼道"] == 3 + 20
    names = Counter(s.name for s in rows if s.label in (HIGH_RISK, "非楼道"))
    assert set(names.values()) == {1}
    # too few copies: the label is topped up to its share with repeats, copies first
    few = stage1_set(samples, 0.1, seed=0, augmented=copies_of(samples, HIGH_RISK, 3))
    n_high = sum(s.label == HIGH_RISK for s in few)
    assert n_high / len(few) >= 0.1 - 1e-9 and n_high > 9
    assert {s.name for s in copies_of(samples, HIGH_RISK, 3)} <= {s.name for s in few}

    rows2 = stage2_set(samples, 3, 2.0, seed=0, augmented=high + other)
    before = stage2_set(samples, 3, 2.0, seed=0)
    assert Counter(s.label for s in rows2) == Counter(s.label for s in before)  # the specialist's sizes stay
    block = [s for s in rows2 if s.label == HIGH_RISK]
    assert len(block) == 18 and len({s.name for s in block}) == 18  # 6 originals + 12 copies, no repeat
    assert {s.name for s in samples if s.label == HIGH_RISK} <= {s.name for s in block}
    assert stage2_set(samples, 3, 2.0, seed=0, augmented=high + other) == rows2  # seeded
    short = stage2_set(samples, 3, 2.0, seed=0, augmented=copies_of(samples, HIGH_RISK, 4))
    block = Counter(s.name for s in short if s.label == HIGH_RISK)
    assert sum(block.values()) == 18 and len(block) == 10  # 6 originals, 4 copies, 8 repeats of originals


def test_stage_sets_applies_the_composition():
    samples = fake_samples()
    copies = copies_of(samples, HIGH_RISK, 7)
    composition = {"stage1_min_share": 0.2, "stage2_high_repeat": 2, "stage2_other_ratio": 1.0}
    one, two = stage_sets(samples, composition, 5, copies)
    assert one == stage1_set(samples, 0.2, 5, copies)
    assert two == stage2_set(samples, 2, 1.0, 5, copies)
    assert DEFAULT_COMPOSITION == {"stage1_min_share": 0.1, "stage2_high_repeat": 3, "stage2_other_ratio": 2.0}
    assert stage_sets(samples, DEFAULT_COMPOSITION, 5) == (stage1_set(samples, 0.1, 5), stage2_set(samples, 3, 2.0, 5))
