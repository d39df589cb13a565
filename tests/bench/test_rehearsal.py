"""bench/rehearsal.py: the scoring rates read back from test.sh's log, whichever scorer wrote them."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from rehearsal import score_numbers  # noqa: E402


def test_score_numbers_reads_one_process_and_shard_lines():
    log = "\n".join([
        "scoring with /o/stage1/checkpoint-1",
        "loaded in 16.4 s",
        "scored 1999 images in 103.7 s (19.3 images/s) -> /o/stage1/test_probs.csv",
        "scoring:  78%|███████▊  | 195/250 [02:42<00:25,  2.20it/s]",
        "[shard 2/2, GPU 1] loaded the model in 14.0 s",
        "[shard 2/2, GPU 1] scored 1000 images in 50.5 s (19.8 images/s) of /o/data/test.jsonl",
    ])
    assert score_numbers(log) == [
        {"images": 1999, "seconds": 103.7, "images_per_s": 19.3, "csv": "/o/stage1/test_probs.csv"},
        {"images": 1000, "seconds": 50.5, "images_per_s": 19.8, "csv": "/o/data/test.jsonl", "process": "shard 2/2"},
    ]
