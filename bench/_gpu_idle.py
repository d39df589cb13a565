"""Where a training step leaves the GPU idle: the gaps between kernels in a torch.profiler chrome trace, and the
Python stacks of the operations that make the CPU wait for the GPU (torch.cuda sync debug mode).

Used by bench/gpu_bench.py (`--profile` writes the trace's summary; BENCH_SYNC_DEBUG=1 records the syncs of one
warm-up step); `python bench/_gpu_idle.py TRACE.json[.gz]` prints the summary of a saved trace.
"""
from __future__ import annotations

import bisect
import gzip
import json
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# runtime calls during which the CPU waits for the GPU (or copies from pageable memory)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def load_trace(path: str | Path) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def idle_summary(events: list[dict], top: int = 25, min_gap_us: float = 50.0) -> dict:
    """GPU busy and idle time over the traced window, the largest gaps between kernels with what the CPU was doing
    (the innermost CPU op running when the gap ended, and the waits inside the gap), and the waits' totals."""
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") in GPU_CATS)
    if not gpu:
        return {"error": "no GPU events in the trace"}
    cpu_ops = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"], e.get("tid")) for e in events
                     if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation"))
    runtime = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                     if e.get("ph") == "X" and e.get("cat") == "cuda_runtime")
    busy, end, gaps = 0.0, gpu[0][0], []
    prev_name = None
    for s, e, name in gpu:
        if s > end + min_gap_us and prev_name is not None:
            gaps.append((s - end, end, s, prev_name, name))
        if e > end:
            busy += e - max(s, end)
            end = e
            prev_name = name
    start = min(gpu[0][0], cpu_ops[0][0] if cpu_ops else gpu[0][0])
    window = end - start
    starts = [r[0] for r in runtime]

    def waits_in(a: float, b: float) -> list[tuple[str, float]]:
        i = bisect.bisect_left(starts, a - 1e6)
        out = []
        for s, e, name in runtime[i:]:
            if s > b:
                break
            if e > a and name.split("_")[0] in WAITS and e - s > 20:
                out.append((name, round((e - s) / 1e3, 2)))
        return out

    def cpu_at(t: float) -> list[str]:  # the CPU ops running at time t, outermost first
        return [name for s, e, name, _ in cpu_ops if s <= t <= e][-4:]

    gaps.sort(reverse=True)
    wait_total = Counter()
    for s, e, name in runtime:
        if name.split("_")[0] in WAITS:
            wait_total[name] += (e - s) / 1e3
    return {
        "window_ms": round(window / 1e3, 1), "gpu_busy_ms": round(busy / 1e3, 1),
        "gpu_idle_ms": round((window - busy) / 1e3, 1),
        f"idle_in_gaps_over_{int(min_gap_us)}us_ms": round(sum(g[0] for g in gaps) / 1e3, 1),
        "gaps": [{"ms": round(g / 1e3, 2), "at_ms": round((a - start) / 1e3, 1), "after": p[:60], "before": n[:60],
                  "cpu_when_gap_ended": cpu_at(b), "waits": waits_in(a, b)} for g, a, b, p, n in gaps[:top]],
        "waits_ms": {k: round(v, 1) for k, v in wait_total.most_common(8)},
    }


class SyncRecorder:
    """torch.cuda.set_sync_debug_mode('warn') between start() and stop(); every synchronizing operation's Python
    stack (this project's, swift's, transformers', accelerate's and peft's frames) is counted."""

    KEEP = ("swift", "transformers", "accelerate", "peft", "tools", "swift_plugins", "gpu_bench", "torch/utils/data")

    def __init__(self):
        self.stacks: Counter = Counter()
        self._old = None

    def _hook(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return self._old(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        frames = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                  for f in stack if any(k in f.filename for k in self.KEEP)]
        frames = frames or [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[-3:]]
        self.stacks[" <- ".join(reversed(frames[-6:]))] += 1

    def start(self) -> None:
        import torch

        if not torch.cuda.is_available():  # nothing to wait for (the CPU smoke test)
            return
        self._old = warnings.showwarning
        warnings.showwarning = self._hook
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> list[dict]:
        import torch

        if self._old is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._old
            self._old = None
        return [{"count": n, "stack": s} for s, n in self.stacks.most_common(30)]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) == 2 else 2)
    print(json.dumps(idle_summary(load_trace(sys.argv[1])), indent=1, ensure_ascii=False))
