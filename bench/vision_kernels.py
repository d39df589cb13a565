"""One vision-tower layer's attention and rotary kernels, timed alone (issue 15's leads for a faster forward pass).

Random tensors shaped as Qwen2.5-VL's vision tower (7B and 3B alike) sees them: 16 heads of 80, 5,120 patches per
1120x896 image, q/k/v as strided views of one qkv product (what swift_plugins/patches/vision_attention.py gets).
Times each way of computing the same thing, in microseconds per call (CUDA events, after a warm-up call):

- full attention (4 of the 32 layers: one segment per image): varlen_attn (before) vs batched SDPA per backend vs
  the patch's own `_long_sdpa` (today), and both kernels' largest error against fp32 attention on one image;
- windowed attention (28 layers: windows of 64 patches): varlen_attn (today) vs the windows batched into SDPA;
- the compiled elementwise chains (vision rotary, RMSNorm of the vision tower and of the 7B's LLM, the vision MLP's
  SiLU*up): eager, compiled with dynamic=True (before: every size symbolic), compiled static, and through the
  patch's own `fused()` (today: only token/batch sizes symbolic); v's copy to a contiguous tensor; a plain copy of
  q's bytes as the memory-bandwidth reference.

    python3 bench/vision_kernels.py --images 4 --out "$OUT/vision_kernels.json"
    python3 bench/vision_kernels.py --images 1 --patches 256 --device cpu     # a smoke test without a GPU
"""
from __future__ import annotations

import argparse
import json
import sys
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


def errors(q, k, v, length: int, scale: float, varlen_attn, va) -> dict:
    """Max |out - fp32 math attention| of one image's full attention: varlen_attn (today) and the patch's SDPA."""
    ref = F.scaled_dot_product_attention(*(t.float().unsqueeze(0).transpose(1, 2) for t in (q, k, v)), scale=scale)
    ref = ref[0].transpose(0, 1)
    cu = torch.tensor([0, length], device=q.device, dtype=torch.int32)
    ways = {"varlen_attn": lambda: varlen_attn(q, k, v.contiguous(), cu, cu, length, length, scale=scale),
            "_long_sdpa": lambda: va._long_sdpa(q, k, v, length, scale)}
    result = {}
    for key, way in ways.items():
        try:
            result[key] = float((way().float() - ref).abs().max())
        except Exception as e:  # noqa: BLE001 - e.g. varlen_attn on a CPU
            result[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--patches", type=int, default=5120, help="patches per image (a multiple of 64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the results")
    ap.add_argument("--only", choices=["all", "compiled"], default="all",
                    help="compiled: the compiled elementwise chains only, no attention rows")
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision as rotary

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import swift_plugins.patches.vision_attention as va

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
            attempt(rows, f"{prefix} varlen_attn ({'before' if prefix == 'full' else 'today'})",
                    lambda cu=cu, length=length: varlen_attn(qc, kc, vc, cu, cu, length, length, scale=scale),
                    dev, a.iters, flops)
        sdpa_rows(prefix, n // length, length, flops)

    if a.only == "all" and varlen_attn is not None:
        # the patch's own full-attention path, as it gets q, k (rotary outputs) and v (a strided view)
        attempt(rows, "full sdpa as patched (_long_sdpa)", lambda: va._long_sdpa(qc, kc, v, s, scale), dev, a.iters,
                4.0 * n * s * HEADS * HEAD_DIM)
        rows["full, max |error| vs fp32 math, image 1"] = errors(qc[:s], kc[:s], v[:s], s, scale, varlen_attn, va)
        print(rows["full, max |error| vs fp32 math, image 1"], flush=True)

    pos = torch.randn(n, HEAD_DIM // 2, device=dev, dtype=torch.float32)
    emb = torch.cat((pos, pos), -1)
    cos, sin = emb.cos(), emb.sin()
    hidden = torch.randn(n, 1280, device=dev, dtype=dt)  # the vision blocks' RMSNorm input
    llm = torch.randn(8, 1365, 3584, device=dev, dtype=dt)  # the 7B's RMSNorm input, a batch of 8 prompts
    eps = torch.tensor(1e-6, device=dev)
    gate, up = (torch.randn(n, 3456, device=dev, dtype=dt) for _ in range(2))  # the padded vision MLP's halves
    cases = {"rotary": (rotary, (q, k, cos, sin), 1),
             "rms_norm vision": (va._rms_norm, (hidden, torch.ones(1280, device=dev, dtype=dt), eps), 1),
             "rms_norm 7B LLM": (va._rms_norm, (llm, torch.ones(3584, device=dev, dtype=dt), eps), 2),
             "silu_mul vision": (va._silu_mul, (gate, up), 1)}
    for key, (fn, args, varying) in cases.items():
        attempt(rows, f"{key} eager", lambda fn=fn, args=args: fn(*args), dev, a.iters)
        dyn, static = torch.compile(fn, dynamic=True), torch.compile(fn, dynamic=False)
        attempt(rows, f"{key} compiled dynamic=True (before)", lambda d=dyn, args=args: d(*args), dev, a.iters)
        attempt(rows, f"{key} compiled static", lambda c=static, args=args: c(*args), dev, a.iters)
        name = key.replace(" ", "_")  # the patch's own fused(): token sizes symbolic, feature sizes static
        attempt(rows, f"{key} fused as patched (today: token sizes symbolic)",
                lambda name=name, fn=fn, args=args, varying=varying: va.fused(name, fn, *args, varying=varying),
                dev, a.iters)
        torch._dynamo.reset()
    if va._COMPILE_ERROR:
        rows["compile errors"] = va._COMPILE_ERROR
    attempt(rows, "v.contiguous() (today)", lambda: v.contiguous(), dev, a.iters)
    attempt(rows, "copy of q's bytes (bandwidth reference)", lambda: qc.clone(), dev, a.iters)

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "images": a.images, "patches": a.patches, "rows": rows}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    print(f"\n| {a.images} images x {a.patches} patches, {name} | us per call | TFLOP/s |\n|---|---:|---:|")
    for key, r in rows.items():
        cell = r.get("us", r.get("error", "")) if isinstance(r, dict) and ("us" in r or "error" in r) else r
        print(f"| {key} | {cell} | {r.get('tflops', '') if isinstance(r, dict) else ''} |")


if __name__ == "__main__":
    main()
