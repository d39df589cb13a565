"""bench/score_memory.py: batches grouped by kind (tokens, padded, compiled), each kind with its largest peaks."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from score_memory import summary  # noqa: E402


def batch(tokens, padded, compiled, allocated, reserved):
    return {"rows": 8, "tokens": tokens, "padded": padded, "compiled": compiled, "allocated_gib": allocated,
            "reserved_gib": reserved}


def test_summary_groups_batches_by_kind_and_keeps_each_kinds_largest_peaks():
    batches = [batch(1365, False, True, 19.0, 20.0), batch(1365, False, True, 19.5, 20.5),
               batch(1365, True, False, 22.8, 23.0), batch(1100, False, True, 18.0, 23.0),
               batch(1365, False, False, 21.0, 22.0)]
    assert summary(batches) == [
        {"tokens": 1100, "padded": False, "compiled": True, "batches": 1, "max_allocated_gib": 18.0,
         "max_reserved_gib": 23.0},
        {"tokens": 1365, "padded": False, "compiled": False, "batches": 1, "max_allocated_gib": 21.0,
         "max_reserved_gib": 22.0},
        {"tokens": 1365, "padded": False, "compiled": True, "batches": 2, "max_allocated_gib": 19.5,
         "max_reserved_gib": 20.5},
        {"tokens": 1365, "padded": True, "compiled": False, "batches": 1, "max_allocated_gib": 22.8,
         "max_reserved_gib": 23.0},
    ]
