"""tools/model/fp8.py: a frozen linear layer in float8, forward and input gradient (torch's CPU float8 matmul)."""
from __future__ import annotations

import pytest
import torch

from tools.model import fp8


def _layer(seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 48, bias=bias)


def test_forward_is_close_to_the_layer():
    lin = _layer()
    x = torch.randn(3, 5, 64)
    q = fp8.Fp8Linear(lin)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (1, 48)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = (out - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.05  # float8 rounding: visible, small


@pytest.mark.parametrize("bias", [True, False])
def test_input_gradient_is_close_to_the_layers(bias):
    lin = _layer(bias=bias)
    q = fp8.Fp8Linear(lin)
    x = torch.randn(2, 7, 64, requires_grad=True)
    grad = torch.randn(2, 7, 48)
    lin(x).backward(grad)
    ref = x.grad.clone()
    x.grad = None
    q(x).backward(grad)
    assert x.grad.shape == ref.shape and x.grad.dtype == ref.dtype
    rel = (x.grad - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.06
    assert all(t.grad is None for t in q.buffers())  # frozen: nothing but the input gets a gradient


def test_input_gradient_is_the_float8_product_it_claims():
    """grad_x = q(grad · s) @ Wq with grad scaled per row: the same numbers computed by hand in float32."""
    lin = _layer(seed=1)
    q = fp8.Fp8Linear(lin)
    x = torch.randn(6, 64, requires_grad=True)
    grad = torch.randn(6, 48)
    q(x).backward(grad)
    g = grad * q.weight_scale
    scale = g.abs().amax(1, keepdim=True) / fp8.FP8_MAX
    by_hand = (g / scale).to(torch.float8_e4m3fn).float() * scale @ q.weight.float()
    torch.testing.assert_close(x.grad, by_hand, rtol=1e-5, atol=1e-6)


def test_bf16_input_gets_a_bf16_gradient():
    lin = _layer().to(torch.bfloat16)
    q = fp8.Fp8Linear(lin)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    out = q(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_fits_needs_sizes_in_sixteens():
    assert fp8.fits(torch.nn.Linear(64, 48))
    assert not fp8.fits(torch.nn.Linear(64, 40)) and not fp8.fits(torch.nn.Linear(20, 48))
