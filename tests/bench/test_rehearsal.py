"""bench/rehearsal.py: the scoring rates read back from test.sh's log, whichever scorer wrote them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from rehearsal import score_numbers  # noqa: E402


def test_score_numbers_reads_one_process_and_shard_lines():
    log = "\n".join([
        "scoring with /o/stage1/checkpoint-1",
        "loaded in 16.4 s",
        "scored 1999 images in 103.7 s (19.3 images/s) -> /o/stage1/test_probs.csv",
        "scored 21 images in 1.8 s (11.7 images/s, peak GPU 19.4 GiB allocated, 20.1 GiB reserved) -> /o/v.csv",
        "scoring:  78%|███████▊  | 195/250 [02:42<00:25,  2.20it/s]",
        "[shard 2/2, GPU 1] loaded the model in 14.0 s",
        "[shard 2/2, GPU 1] scored 1000 images in 50.5 s (19.8 images/s) of /o/data/test.jsonl",
    ])
    assert score_numbers(log) == [
        {"images": 1999, "seconds": 103.7, "images_per_s": 19.3, "csv": "/o/stage1/test_probs.csv"},
        {"images": 21, "seconds": 1.8, "images_per_s": 11.7, "csv": "/o/v.csv", "peak_gib_allocated": 19.4,
         "peak_gib_reserved": 20.1},
        {"images": 1000, "seconds": 50.5, "images_per_s": 19.8, "csv": "/o/data/test.jsonl", "process": "shard 2/2"},
    ]


def test_test_sizes_parse_and_plan_in_their_shares():
    import numpy as np

    from rehearsal import parse_sizes, size_plan

    sizes = parse_sizes("4032x3024:0.7, 1920x1080:0.2,3024X3024:0.1")
    assert sizes == [((4032, 3024), 0.7), ((1920, 1080), 0.2), ((3024, 3024), 0.1)]
    plan = size_plan(21, sizes, np.random.default_rng(0))
    assert [plan.count(s) for s, _ in sizes] == [15, 4, 2]  # 14.7, 4.2, 2.1 rounded; the first takes the rest
    assert len(set(plan[:15])) > 1  # shuffled, not in blocks
    for bad in ("4032x3024:0.5", "4032-3024:1", "axb:1"):
        with pytest.raises(SystemExit):
            parse_sizes(bad)


def test_make_data_writes_test_photos_in_the_planned_sizes(tmp_path):
    from PIL import Image, ImageOps

    from rehearsal import make_data, parse_sizes

    sizes = parse_sizes("64x48:0.5,80x45:0.5")
    made = make_data(tmp_path / "data", 4, 10, (64, 48), 1, sizes)
    assert made["test_sizes"] == [["64x48", 0.5], ["80x45", 0.5]]
    upright = []
    for line in (tmp_path / "data" / "B.txt").read_text().splitlines()[1:]:  # the first is truncated on purpose
        with Image.open(tmp_path / "data" / "B" / line.split("\t")[0]) as img:
            upright.append(ImageOps.exif_transpose(img).size)  # EXIF-rotated ones stored turned
    assert sorted(set(upright)) == [(64, 48), (80, 45)]
    for line in (tmp_path / "data" / "train.txt").read_text().splitlines():
        with Image.open(tmp_path / "data" / "train" / line.split("\t")[0]) as img:
            assert ImageOps.exif_transpose(img).size == (64, 48)
    assert make_data(tmp_path / "data", 4, 10, (64, 48), 1, sizes) == made  # made already: read back
    with pytest.raises(SystemExit, match="another --work"):
        make_data(tmp_path / "data", 4, 10, (64, 48), 1, None)
