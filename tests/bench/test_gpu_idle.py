"""bench/_gpu_idle.py: the GPU's idle time and gaps read from a torch.profiler chrome trace."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _gpu_idle import idle_summary, load_trace  # noqa: E402


def x(cat, name, ts, dur, **kw):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **kw}


def test_idle_summary_finds_the_gap_and_the_wait_inside_it(tmp_path):
    events = [
        x("cpu_op", "step", 0, 20000, tid=1),
        x("kernel", "k1", 100, 2900), x("kernel", "k1b", 1000, 3000),  # overlapping kernels count once
        x("cpu_op", "aten::item", 4000, 5000, tid=1), x("cuda_runtime", "cudaStreamSynchronize", 4100, 3800),
        x("kernel", "k2", 10000, 1000), x("kernel", "k3", 11020, 780),  # a 20 us gap: below the threshold
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5},  # not a complete event: ignored
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = idle_summary(load_trace(path))
    assert s["window_ms"] == 11.8 and s["gpu_busy_ms"] == 5.7 and s["gpu_idle_ms"] == 6.1
    assert [g["ms"] for g in s["gaps"]] == [6.0]  # 4000 -> 10000 us; the 20 us one is not listed
    gap = s["gaps"][0]
    assert gap["after"] == "k1b" and gap["before"] == "k2" and gap["cpu_when_gap_ended"] == ["step"]
    assert gap["waits"] == [("cudaStreamSynchronize", 3.8)]
    assert s["waits_ms"] == {"cudaStreamSynchronize": 3.8}
    assert idle_summary([x("cpu_op", "a", 0, 1)]) == {"error": "no GPU events in the trace"}
