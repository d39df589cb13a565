"""bench/vision_kernels.py: each variant's time, or the reason this machine cannot run it, in the results."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from vision_kernels import attempt  # noqa: E402


def test_attempt_records_a_time_or_the_error():
    rows: dict = {}
    attempt(rows, "sum", lambda: sum(range(1000)), "cpu", 3, flops=2e3)
    assert rows["sum"]["us"] > 0 and rows["sum"]["tflops"] == round(2e3 / rows["sum"]["us"] / 1e6, 1)

    def no_kernel():
        raise RuntimeError("No viable backend for scaled_dot_product_attention was found.\nmore detail")

    attempt(rows, "cudnn", no_kernel, "cpu", 3)
    assert rows["cudnn"] == {"error": "RuntimeError: No viable backend for scaled_dot_product_attention was found."}
