"""Compiled LoRA layers with dropout: masks from PyTorch's own kernels (torch._inductor.config.fallback_random = True,
what swift_plugins/patches/compile_layers.py sets) or drawn inside the compiler's fused kernels (False). Two questions,
one process, no model files (bench/README.md, "Compiled decoder layers in training", tried and dropped):

1. Does a checkpointed layer draw the same masks again in its recompute? Gradients through checkpointed compiled
   layers (reentrant and not) against the same layers without checkpointing, same seed: the max difference.
2. What does drawing them in the fused kernels save? Forward + backward of a stack of layers shaped like
   Qwen2.5-VL-3B's (hidden 2048, MLP 11008, 16 heads, 2 key/value heads, LoRA r8 on all seven projections, dropout
   0.05, bf16 under autocast with fp32 adapters as swift trains), batch 8 x 1,365 tokens, every layer checkpointed.

    python3 bench/compile_dropout.py --out "$OUT"            # on the GPU machine (~1 min)
    python3 bench/compile_dropout.py --small                 # a quick run on a CPU (tiny shapes)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as ck


class LoraLinear(nn.Module):
    """PEFT's LoRA forward: base(x) + B(A(dropout(x))) * scale, the adapter in fp32."""

    def __init__(self, n_in: int, n_out: int, rank: int, p: float):
        super().__init__()
        self.base = nn.Linear(n_in, n_out, bias=False).requires_grad_(False)
        self.a = nn.Linear(n_in, rank, bias=False)
        self.b = nn.Linear(rank, n_out, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)  # PEFT starts B at 0, which would hide the dropout
        self.drop, self.scale = nn.Dropout(p), 4.0

    def forward(self, x):
        return self.base(x) + self.b(self.a(self.drop(x))) * self.scale


class Layer(nn.Module):
    """A Qwen2-style decoder layer: RMSNorm, q/k/v/o with grouped keys, SDPA, RMSNorm, SwiGLU MLP."""

    def __init__(self, hidden: int, mlp: int, heads: int, kv: int, rank: int, p: float):
        super().__init__()
        self.heads, self.kv, self.dim = heads, kv, hidden // heads
        self.q, self.o = LoraLinear(hidden, hidden, rank, p), LoraLinear(hidden, hidden, rank, p)
        self.k, self.v = LoraLinear(hidden, kv * self.dim, rank, p), LoraLinear(hidden, kv * self.dim, rank, p)
        self.gate, self.up = LoraLinear(hidden, mlp, rank, p), LoraLinear(hidden, mlp, rank, p)
        self.down = LoraLinear(mlp, hidden, rank, p)
        self.n1, self.n2 = nn.RMSNorm(hidden).requires_grad_(False), nn.RMSNorm(hidden).requires_grad_(False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, t, self.heads, self.dim).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv, self.dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv, self.dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def build(shape: dict, layers: int, device: str, dtype: torch.dtype, fallback_random: bool, seed: int = 0):
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()  # fallback_random is read when a graph compiles
    torch._inductor.config.fallback_random = fallback_random
    torch.manual_seed(seed)
    stack = nn.ModuleList(Layer(**shape) for _ in range(layers)).to(device)
    for name, param in stack.named_parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)  # frozen weights in bf16, adapters fp32 (swift's LoRA)
    for layer in stack:
        layer.compile(dynamic=False)
    return stack


def run(stack, x0, mode: str, device: str, dtype: torch.dtype, seed: int = 123):
    """One forward + backward; mode: none | reentrant | nonreentrant. Returns (loss, adapter grads)."""
    torch.manual_seed(seed)
    x = x0.clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        h = x
        for layer in stack:
            h = layer(h) if mode == "none" else ck.checkpoint(layer, h, use_reentrant=mode == "reentrant")
        loss = h.float().pow(2).mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in stack.parameters() if p.grad is not None]
    for p in stack.parameters():
        p.grad = None
    return loss.detach(), grads


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU check of the script)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="timed forward + backward passes (after 3 warm-up)")
    ap.add_argument("--out", type=Path, default=None, help="write compile_dropout.json here")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.small:
        shape, batch, tokens = dict(hidden=64, mlp=128, heads=4, kv=2, rank=4, p=0.3), 2, 32
    else:
        shape, batch, tokens = dict(hidden=2048, mlp=11008, heads=16, kv=2, rank=8, p=0.05), 8, 1365
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "shape": shape, "batch": batch, "tokens": tokens, "layers": a.layers, "runs": {}}
    x0 = torch.randn(batch, tokens, shape["hidden"], device=device)
    for mode_name, fallback in (("eager", True), ("fused", False)):  # fallback_random
        stack = build(shape, a.layers, device, dtype, fallback)
        # 1. recompute draws the masks again: checkpointed vs not, same seed
        loss0, ref = run(stack, x0, "none", device, dtype)
        check = {}
        for ckpt in ("reentrant", "nonreentrant"):
            loss, grads = run(stack, x0, ckpt, device, dtype)
            check[ckpt] = {"loss_equal": bool(loss == loss0),
                           "max_grad_diff": max((g - r).abs().max().item() for g, r in zip(grads, ref)),
                           "max_grad": max(r.abs().max().item() for r in ref)}
        # 2. speed and memory, every layer checkpointed (reentrant: swift's choice on one GPU)
        for _ in range(3):
            run(stack, x0, "reentrant", device, dtype)
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(a.steps):
            run(stack, x0, "reentrant", device, dtype)
        sync(device)
        ms = (time.perf_counter() - start) / a.steps / a.layers * 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        results["runs"][mode_name] = {"recompute": check, "ms_per_layer": round(ms, 3),
                                      "peak_allocated_gib": None if peak is None else round(peak, 2)}
        del stack
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "compile_dropout.json").write_text(json.dumps(results, indent=1))
    print("| dropout | ms / layer (fwd + bwd, recompute) | peak GiB | reentrant: loss equal, max grad diff | "
          "non-reentrant | largest grad |")
    print("|---|---:|---:|---|---|---:|")
    for name, r in results["runs"].items():
        c = r["recompute"]
        print(f"| {name} | {r['ms_per_layer']} | {r['peak_allocated_gib']} | {c['reentrant']['loss_equal']}, "
              f"{c['reentrant']['max_grad_diff']:.3g} | {c['nonreentrant']['loss_equal']}, "
              f"{c['nonreentrant']['max_grad_diff']:.3g} | {c['reentrant']['max_grad']:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
