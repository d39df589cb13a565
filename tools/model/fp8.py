"""Float8 (e4m3) linear layers with frozen weights, for scoring (SCORE_FP8, tools.model.speedups) and for LoRA
training on frozen base weights (FP8_BASE_STAGE1/2, swift_plugins/patches/fp8_base.py).

A weight is stored once in float8 with a scale per output channel; each input row (token) gets its own scale on the
fly, and one `torch._scaled_mm` runs the product with the bias. The backward gives the input's gradient only (the
weight is frozen): grad_x = grad @ (diag(s) · Wq), so the weight's row scales s are folded into grad's columns, grad
is scaled to float8 per row like an input, and the same float8 weight is used transposed (a [in, out] copy made for
the call: _scaled_mm wants its second operand column-major). So the forward, checkpointing's recompute and the
backward all run float8 products, and the weights take half the memory of bf16.

float8 keeps ~3 significant bits per weight, activation and gradient: what that changes is measured in
bench/README.md (scoring: "Scoring levers"; training: "Float8 base weights in training").
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest float8 e4m3 value


def _rowwise(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, k] -> (float8 [rows, k], float32 scale [rows, 1]) with x2 ≈ float8 · scale."""
    scale = x2.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x2.float() / scale).to(FP8), scale


class _Fp8Matmul(torch.autograd.Function):
    """x2 @ (diag(s) Wq)ᵀ + bias with float8 products; the gradient reaches x2 only."""

    @staticmethod
    def forward(ctx, x2, weight, weight_scale, bias, out_dtype):
        xq, scale = _rowwise(x2)
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype = x2.dtype
        return torch._scaled_mm(xq, weight.t(), scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        gq, scale = _rowwise(grad.float() * weight_scale)  # [tokens, out]: the weight's row scales folded in
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        grad_x = torch._scaled_mm(gq, weight.t().contiguous().t(), scale_a=scale, scale_b=ones, out_dtype=ctx.x_dtype)
        return grad_x, None, None, None, None


class Fp8Linear(torch.nn.Module):
    """A float8 copy of a frozen nn.Linear (see the module docstring); output in the layer's dtype."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / FP8_MAX  # [out]
        # stored [out, in] row-major and used transposed: _scaled_mm wants its second operand column-major
        self.register_buffer("weight", (w / scale[:, None]).to(FP8))
        self.register_buffer("weight_scale", scale[None, :].contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features, self.out_dtype = linear.in_features, linear.out_features, linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        bias = None if self.bias is None else self.bias.to(self.out_dtype)
        out = _Fp8Matmul.apply(x.reshape(-1, shape[-1]), self.weight, self.weight_scale, bias, self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3"


def swap_in(root: torch.nn.Module, name: str) -> Fp8Linear:
    """Replace root's nn.Linear `name` (a dotted path) by its float8 copy, in place; returns the copy."""
    parent, _, child = name.rpartition(".")
    copy = Fp8Linear(root.get_submodule(name))
    setattr(root.get_submodule(parent), child, copy)
    return copy


def fits(linear: torch.nn.Linear) -> bool:
    """_scaled_mm needs both sizes to be multiples of 16 (every Qwen2.5-VL projection is)."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def supported() -> str | None:
    """None when this machine can run float8 matmuls on its GPU, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} < 8.9 (float8 needs Ada or Hopper)"
    return None
