"""tools.augment.render: a plan rendered to JPEGs; the same seed gives the same bytes with any number of workers."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import write_samples
from tools.augment.plan import AugmentJob, job_seed, plan_augmentation
from tools.augment.render import render_job, run_plan

SMALL = 224 * 168  # max_pixels for the tests: a 224² demo image becomes 196×196


def digests(records) -> dict[str, str]:
    return {r.name: hashlib.sha256(Path(r.path).read_bytes()).hexdigest() for r in records}


def test_same_seed_same_bytes_with_one_or_two_workers(tmp_path, cutouts):
    samples = write_samples(tmp_path / "train", ["高风险", "无风险", "低风险", "非楼道"])
    jobs = plan_augmentation(samples, {"高风险": 2, "非楼道": 1, "低风险": 1}, seed=7, cutouts=cutouts)
    assert any("insert" in j.transforms for j in jobs)
    one = run_plan(jobs, tmp_path / "w1", workers=1, max_pixels=SMALL, progress=False)
    two = run_plan(jobs, tmp_path / "w2", workers=2, chunksize=2, max_pixels=SMALL, progress=False)
    assert digests(one) == digests(two) and len(one) == len(jobs)
    jobs8 = plan_augmentation(samples, {"高风险": 2, "非楼道": 1, "低风险": 1}, seed=8, cutouts=cutouts)
    other = run_plan(jobs8, tmp_path / "s8", workers=1, max_pixels=SMALL, progress=False)
    assert set(digests(other)) == set(digests(one))  # same names ...
    assert all(digests(other)[n] != d for n, d in digests(one).items())  # ... different images
    for r, j in zip(one, jobs):
        assert r.name == f"{Path(j.sample.name).stem}_aug{j.copy}.jpg" and r.label == j.label
        assert r.source == f"augment:{j.sample.source}"
        with Image.open(r.path) as im:
            w, h = im.size
            assert im.mode == "RGB" and w % 28 == 0 and h % 28 == 0 and w * h <= SMALL
        assert Path(r.path).read_bytes() == render_job(j, max_pixels=SMALL)  # the file is the job's bytes
    assert not list((tmp_path / "w2").glob(".*.tmp"))  # no temporary left behind


def test_run_plan_refusals(tmp_path):
    (s,) = write_samples(tmp_path / "train", ["无风险"])
    job = AugmentJob(s, 1, job_seed(0, s.name, 1), ("geometric",))
    with pytest.raises(ValueError, match="same file"):
        run_plan([job, job], tmp_path / "out", workers=1, progress=False)
    broken = AugmentJob(s, 2, job_seed(0, s.name, 2), ("insert",), str(tmp_path / "no-such-cutout.png"))
    with pytest.raises(RuntimeError, match=r"augmenting .*img00.jpg \(copy 2, insert\)"):
        run_plan([broken], tmp_path / "out", workers=1, max_pixels=SMALL, progress=False)
    assert run_plan([], tmp_path / "empty", workers=1, progress=False) == []
