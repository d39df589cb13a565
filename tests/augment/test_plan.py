"""tools.augment.plan: the balancing plan (copies per label, insertion jobs), job seeds, and the LABEL=NUMBER knob."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.helpers import fake_samples
from tools.augment import plan as P
from tools.augment.images import list_cutouts
from tools.data.lists import Sample
from tools.task import HIGH_RISK, LABELS


def per_label(jobs, inserted=False):
    return {label: sum(j.sample.label == label and ("insert" in j.transforms) == inserted for j in jobs)
            for label in LABELS}


def test_balancing_plan_counts_match_the_multipliers(cutouts):
    counts = {"高风险": 3, "中风险": 4, "低风险": 5, "无风险": 10, "非楼道": 2}
    samples = fake_samples(counts)

    jobs = P.plan_augmentation(samples, seed=1)  # defaults, no cut-outs: no insertion
    assert per_label(jobs) == {label: int(P.DEFAULT_MULTIPLIERS[label]) * n for label, n in counts.items()}
    assert per_label(jobs, inserted=True) == dict.fromkeys(LABELS, 0)
    assert all(sum(j.sample.name == s.name for j in jobs) == 10 for s in samples if s.label == "高风险")

    jobs = P.plan_augmentation(samples, {"中风险": 2, "高风险": 1}, {"非楼道": 9}, seed=1, cutouts=cutouts)
    assert per_label(jobs) == {"高风险": 3, "中风险": 8, "低风险": 0, "无风险": 0, "非楼道": 7}
    ins = per_label(jobs, inserted=True)
    assert sum(ins.values()) == 2 * counts["高风险"] and set(k for k, v in ins.items() if v) <= set(P.INSERT_SOURCES)
    assert len({j.seed for j in jobs}) == len(jobs) and len({j.out_name for j in jobs}) == len(jobs)
    assert sum(j.label == HIGH_RISK for j in jobs) == 3 + 6

    half = P.plan_augmentation(samples, {"无风险": 0.5, "高风险": 0}, seed=2, n_insert=0)
    none_jobs = [j for j in half if j.sample.label == "无风险"]
    assert len(none_jobs) == 5 and len({j.sample.name for j in none_jobs}) == 5  # half the originals, one each
    assert P.plan_augmentation(samples, seed=1) == P.plan_augmentation(samples, seed=1)
    seeds = [[j.seed for j in P.plan_augmentation(samples, seed=s)] for s in (1, 2)]
    assert seeds[0] != seeds[1]
    with pytest.raises(ValueError):
        P.plan_augmentation(samples, {"危险": 1})


def test_only_insertion_jobs_make_high_risk(cutouts):
    samples = [Sample(f"{i}.jpg", Path(f"/x/{i}.jpg"), label, f"t:{i}") for i, label in enumerate(LABELS * 2)]
    jobs = P.plan_augmentation(samples, {label: 1 for label in LABELS}, seed=0, cutouts=list_cutouts(cutouts))
    assert all(j.label == (HIGH_RISK if "insert" in j.transforms else j.sample.label) for j in jobs)
    inserted = [j for j in jobs if "insert" in j.transforms]
    assert inserted and all(j.sample.label in P.INSERT_SOURCES and j.cutout for j in inserted)
    assert all(j.transforms[0] == "insert" for j in inserted)  # pasted first, then transformed with the scene
    assert all(j.cutout is None and j.transforms for j in jobs if j not in inserted)  # a plain job gets at least one
    # copies are numbered per original, 1..n, insertion copies after the plain ones
    for s in samples:
        mine = [j for j in jobs if j.sample.name == s.name]
        assert [j.copy for j in mine] == list(range(1, len(mine) + 1))
        assert [("insert" in j.transforms) for j in mine] == sorted("insert" in j.transforms for j in mine)


def test_plan_refusals(cutouts):
    samples = fake_samples({"高风险": 2, "无风险": 2})
    with pytest.raises(ValueError, match="negative multiplier"):
        P.plan_augmentation(samples, {"高风险": -1})
    with pytest.raises(ValueError, match="unknown label"):
        P.plan_augmentation(samples, targets={"x": 3})
    with pytest.raises(ValueError, match="duplicate sample names"):
        P.plan_augmentation(samples + samples[:1])
    with pytest.raises(ValueError, match="labelled samples"):
        P.plan_augmentation([Sample("a.jpg", Path("/x/a.jpg"), None, "t")])
    with pytest.raises(ValueError, match="need cut-outs"):
        P.plan_augmentation(samples, n_insert=2)
    with pytest.raises(ValueError, match="insertion needs"):
        P.plan_augmentation(fake_samples({"高风险": 2, "中风险": 2}), cutouts=cutouts)


def test_output_names_stay_apart_for_equal_stems():
    samples = [Sample("a.jpg", Path("/x/a.jpg"), HIGH_RISK, "t:1"), Sample("a.png", Path("/x/a.png"), HIGH_RISK, "t:2")]
    jobs = P.plan_augmentation(samples, {HIGH_RISK: 2}, seed=0)
    assert [j.out_name for j in jobs] == ["a_aug1.jpg", "a_aug2.jpg", "a_png_aug1.jpg", "a_png_aug2.jpg"]


def test_job_seed_depends_on_seed_name_and_copy():
    base = P.job_seed(0, "a.jpg", 1)
    assert P.job_seed(0, "a.jpg", 1) == base
    assert len({base, P.job_seed(1, "a.jpg", 1), P.job_seed(0, "b.jpg", 1), P.job_seed(0, "a.jpg", 2)}) == 4
    assert 0 <= base < 2 ** 64


def test_parse_label_numbers():
    assert P.parse_label_numbers("高风险=10,非楼道=4") == {"高风险": 10.0, "非楼道": 4.0}
    assert P.parse_label_numbers(" 高风险 = 0.5 ，非楼道=1,") == {"高风险": 0.5, "非楼道": 1.0}  # full-width comma
    assert P.parse_label_numbers("高风险=400", kind=int) == {"高风险": 400}
    assert P.parse_label_numbers("") == {}
    for bad, message in (("危险=1", "expected LABEL=NUMBER"), ("高风险", "expected LABEL=NUMBER"),
                         ("高风险=x", "not a number"), ("高风险=-1", "negative"), ("高风险=1.5", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            P.parse_label_numbers(bad, kind=int if bad == "高风险=1.5" else float)
