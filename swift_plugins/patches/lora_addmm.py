"""Patch (on import): PEFT's LoRA `Linear.forward` adds the adapter's product inside the matrix product.

PEFT computes `result + lora_B(lora_A(dropout(x))) * scaling`: after the small rank-r products come two
element-wise passes over the layer's whole output ([tokens, out_features]: a multiply by `scaling`, then the add),
and a third in the backward (the multiply's gradient). For the 7B's seven adapted linears per layer at 5,460 tokens
that is ~0.5 GB of memory traffic per pass per layer, an estimated ~65 ms of a 620 ms training micro-step on an H200
(the measured saving was smaller: see the knob below). Here the output is one `torch.addmm(result, h, (B · scaling)ᵀ)`: the add runs in the GEMM's
epilogue and the scaling is applied to the [out, r] weight, not to the output. Same function, same gradients
(the product is accumulated before one rounding instead of rounded, scaled, rounded and added).

Only the plain case takes this path: one active adapter, no DoRA or other variant, no bias on B, not merged, no
per-row adapter names or extra arguments, matching dtypes (or autocast), and no ZeRO-3 partition (B's weight is
read outside B's own forward, which ZeRO-3 does not allow). Everything else runs PEFT's own forward.

Knob (environment, read at import): FIRESAFE_LORA_ADDMM  off (default) | auto (on CUDA) | on. Off by default: on
an H200 it saved 2 % of a 7B micro-step (625 -> 611 ms) and nothing measurable in train.sh (7B 6.18 vs 6.16
samples/s, 3B 6.42 vs 6.61: within the runs' noise), so PEFT's own code stays the default (bench/README.md).
"""
from __future__ import annotations

import os

import torch

from swift_plugins._patching import original_of
from swift_plugins._zero import is_zero3

MODE = os.environ.get("FIRESAFE_LORA_ADDMM", "off").strip().lower()
if MODE not in ("auto", "on", "off"):
    raise ValueError(f"FIRESAFE_LORA_ADDMM={MODE!r}: expected auto, on or off")


def _lora_linear():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a swift dependency
        return None
    return Linear


def _wanted(x: torch.Tensor) -> bool:
    return MODE == "on" or (MODE == "auto" and x.is_cuda)


def addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    original = addmm_forward.__wrapped_original__
    if args or kwargs or not _wanted(x) or self.disable_adapters or self.merged:
        return original(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or active[0] in self.lora_variant:
        return original(self, x, *args, **kwargs)
    name = active[0]
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if (not isinstance(lora_B, torch.nn.Linear) or lora_B.bias is not None or is_zero3(lora_B.weight)
            or is_zero3(lora_A.weight)):
        return original(self, x, *args, **kwargs)
    self._check_forward_args(x)
    result = self.base_layer(x)
    h = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))
    if not torch.is_autocast_enabled(x.device.type) and not (result.dtype == h.dtype == lora_B.weight.dtype):
        return (result + lora_B(h) * self.scaling[name]).to(result.dtype)  # mixed dtypes: PEFT's arithmetic
    weight = lora_B.weight * self.scaling[name]  # [out, r]: the scaling on r x out numbers, not on the output
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t())
    return out.view(result.shape).to(result.dtype)


def apply(mode: str | None = None) -> None:
    """Install the patch (idempotent); `mode` overrides the environment's choice."""
    global MODE
    MODE = mode or MODE
    linear = _lora_linear()
    if linear is None:
        return
    original = original_of(linear.forward)
    addmm_forward.__wrapped_original__ = original
    linear.forward = original if MODE == "off" else addmm_forward


def restore() -> None:
    """Back to PEFT's own forward (for tests and benchmarks)."""
    linear = _lora_linear()
    if linear is not None:
        linear.forward = original_of(linear.forward)


apply()
