"""swift_plugins/patches/lora_addmm.py: PEFT's LoRA forward with the adapter added inside one addmm computes the
same outputs and gradients, and leaves every case it does not cover to PEFT."""
from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
la = pytest.importorskip("swift_plugins.patches.lora_addmm")


def lora_model(dtype=torch.float32, dropout=0.0, **config):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).to(dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                      lora_dropout=dropout, **config))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float().normal_() * 0.5  # B starts at zero: give it values, in fp32 as swift trains
    return model


def run(model, x, mode, autocast=False, train=False):
    """(output, gradients of the adapters) with the patch in `mode`; the same seed for dropout each time."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    la.apply(mode)
    try:
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        if out.requires_grad:
            out.float().square().sum().backward()
    finally:
        la.apply("off")
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train", [False, True])
def test_same_outputs_and_gradients_as_peft_in_fp32(train):
    model = lora_model(dropout=0.1)
    x = torch.randn(3, 5, 32)
    expected, grads = run(model, x, "off", train=train)
    calls = []
    original = torch.addmm
    try:
        torch.addmm = lambda *a, **k: calls.append(1) or original(*a, **k)
        got, got_grads = run(model, x, "on", train=train)
    finally:
        torch.addmm = original
    assert len(calls) == 2  # both adapted layers took the fused path
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(grads) and any("lora_B" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(got_grads[n], grads[n], rtol=1e-4, atol=1e-5)


def test_bf16_model_with_fp32_adapters_under_autocast():
    """How swift trains: bf16 base, fp32 adapters, autocast. One rounding instead of three: against the same model
    in fp32, the fused path's error is no larger than PEFT's own."""
    import copy

    model = lora_model(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    x = torch.randn(4, 7, 32, dtype=torch.bfloat16)
    exact, exact_grads = run(reference, x.float(), "off", train=True)
    expected, grads = run(model, x, "off", autocast=True, train=True)
    got, got_grads = run(model, x, "on", autocast=True, train=True)
    assert got.dtype == expected.dtype == torch.bfloat16

    def error(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert error(got, exact) <= 1.1 * error(expected, exact) and error(got, exact) < 0.02
    for n in grads:
        assert got_grads[n].dtype == torch.float32
        assert error(got_grads[n], exact_grads[n]) <= 1.1 * error(grads[n], exact_grads[n]) + 1e-3


def test_other_cases_run_peft(monkeypatch):
    x = torch.randn(2, 32)
    calls = []
    original = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or original(*a, **k))
    for model in (lora_model(use_dora=True), lora_model(lora_bias=True)):
        expected, _ = run(model, x, "off")
        got, _ = run(model, x, "on")
        torch.testing.assert_close(got, expected)
    model = lora_model()
    with model.disable_adapter():
        run(model, x, "on")
    model.base_model.model[0].merge()  # a merged layer: its base weight already holds the adapter
    run(model, x, "on")
    assert calls == [1]  # only the unmerged second layer of the last model
    calls.clear()
    run(lora_model(), x, "auto")  # auto: CUDA only
    assert calls == []


def test_zero3_partitioned_adapter_runs_peft(monkeypatch):
    from swift_plugins import _zero

    model = lora_model()
    layer = model.base_model.model[0]
    monkeypatch.setattr(la, "is_zero3", lambda p: p is layer.lora_B["default"].weight or _zero.is_zero3(p))
    calls = []
    original = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or original(*a, **k))
    run(model, torch.randn(2, 32), "on")
    assert calls == [1]  # the other layer only


def test_bad_knob(monkeypatch):
    import importlib

    monkeypatch.setenv("FIRESAFE_LORA_ADDMM", "sometimes")
    with pytest.raises(ValueError, match="FIRESAFE_LORA_ADDMM"):
        importlib.reload(la)
    monkeypatch.delenv("FIRESAFE_LORA_ADDMM")
    importlib.reload(la)
    assert la.MODE == "off"
