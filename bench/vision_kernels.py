"""One vision-tower layer's attention and rotary kernels, timed alone (issue 15's leads for a faster forward pass).

Random tensors shaped as Qwen2.5-VL's vision tower (7B and 3B alike) sees them: 16 heads of 80, 5,120 patches per
1120x896 image, q/k/v as strided views of one qkv product (what swift_plugins/patches/vision_attention.py gets).
Times each way of computing the same thing, in microseconds per call (CUDA events, after a warm-up call):

- full attention (4 of the 32 layers: one segment per image): varlen_attn (today) vs batched SDPA per backend;
- windowed attention (28 layers: windows of 64 patches): varlen_attn (today) vs the windows batched into SDPA;
- rotary: transformers' function eager, compiled with dynamic shapes (today), compiled static, compiled with
  automatic dynamic shapes after a second patch count (only the size that changed becomes symbolic); v's copy to a
  contiguous tensor; a plain copy of q's bytes as the memory-bandwidth reference.

    python3 bench/vision_kernels.py --images 4 --out "$OUT/vision_kernels.json"
    python3 bench/vision_kernels.py --images 1 --patches 256 --device cpu     # a smoke test without a GPU
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, WINDOW = 16, 80, 64


def timed(fn, device: str, iters: int) -> float:
    """Microseconds per call of fn() (one warm-up call first, which also compiles)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters * 1000
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


def attempt(rows: dict, name: str, fn, device: str, iters: int, flops: float | None = None) -> None:
    """rows[name] = {us, tflops} or {error}: a backend this machine lacks is a result too."""
    try:
        us = timed(fn, device, iters)
    except Exception as e:  # noqa: BLE001 - no such kernel for this shape or device
        rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    else:
        rows[name] = {"us": round(us, 1), **({"tflops": round(flops / us / 1e6, 1)} if flops else {})}
    print(f"{name}: {rows[name]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--patches", type=int, default=5120, help="patches per image (a multiple of 64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the results")
    ap.add_argument("--only", choices=["all", "rotary"], default="all", help="rotary: skip the attention rows")
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision as rotary

    dev, dt = a.device, torch.bfloat16 if a.device == "cuda" else torch.float32
    n, s = a.images * a.patches, a.patches
    torch.manual_seed(0)
    qkv = torch.randn(n, 3, HEADS, HEAD_DIM, device=dev, dtype=dt)
    q, k, v = qkv.unbind(1)  # strided views, as the patched attention has them
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    scale = HEAD_DIM ** -0.5
    rows: dict = {}
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH]

    def sdpa_rows(prefix: str, batch: int, length: int, flops: float) -> None:
        qb, kb, vb = (t.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2) for t in (qc, kc, vc))
        for backend in backends:
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
            attempt(rows, f"{prefix} sdpa {backend.name.lower()}", run, dev, a.iters, flops)

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    for prefix, length in (("full", s), ("window", WINDOW)) if a.only == "all" else ():
        flops = 4.0 * n * length * HEADS * HEAD_DIM  # QK^T and PV, every segment of `length`
        cu = torch.arange(0, n + 1, length, device=dev, dtype=torch.int32)
        if varlen_attn is not None:
            attempt(rows, f"{prefix} varlen_attn (today)",
                    lambda cu=cu, length=length: varlen_attn(qc, kc, vc, cu, cu, length, length, scale=scale),
                    dev, a.iters, flops)
        sdpa_rows(prefix, n // length, length, flops)

    pos = torch.randn(n, HEAD_DIM // 2, device=dev, dtype=torch.float32)
    emb = torch.cat((pos, pos), -1)
    cos, sin = emb.cos(), emb.sin()
    attempt(rows, "rotary eager", lambda: rotary(q, k, cos, sin), dev, a.iters)
    dyn, static = torch.compile(rotary, dynamic=True), torch.compile(rotary, dynamic=False)
    attempt(rows, "rotary compiled dynamic (today)", lambda: dyn(q, k, cos, sin), dev, a.iters)
    attempt(rows, "rotary compiled static", lambda: static(q, k, cos, sin), dev, a.iters)
    attempt(rows, "rotary compiled static, contiguous q k", lambda: static(qc, kc, cos, sin), dev, a.iters)
    auto = torch.compile(rotary)  # dynamic=None: static first, then symbolic only in the size that changed
    half = n // 2  # the first patch count it sees (a failure there is a row's error too, as everywhere)
    attempt(rows, "rotary compiled automatic dynamic, first patch count (half)",
            lambda: auto(q[:half], k[:half], cos[:half], sin[:half]), dev, a.iters)
    attempt(rows, "rotary compiled automatic dynamic (after a second patch count)", lambda: auto(q, k, cos, sin), dev,
            a.iters)
    attempt(rows, "v.contiguous() (today)", lambda: v.contiguous(), dev, a.iters)
    attempt(rows, "copy of q's bytes (bandwidth reference)", lambda: qc.clone(), dev, a.iters)

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "images": a.images, "patches": a.patches, "rows": rows}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    print(f"\n| {a.images} images x {a.patches} patches, {name} | us per call | TFLOP/s |\n|---|---:|---:|")
    for key, r in rows.items():
        print(f"| {key} | {r.get('us', r.get('error', ''))} | {r.get('tflops', '')} |")


if __name__ == "__main__":
    main()
