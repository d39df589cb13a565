"""DeepSpeed ZeRO-2/ZeRO-3 safety of the High-Risk Feature Amplifier (swift_plugins/_amplifier.py, _zero.py), on CPU:
one parameter per biased layer, each reduced once per backward under reentrant gradient checkpointing (ZeRO-2's
"gradient computed twice" check), every parameter read only inside its owner module's forward (ZeRO-3 gathers
nothing else), and the stats and the save that read parameters outside a forward."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.swift_plugins.support import fake_zero3, micro_amplified, micro_batch, micro_loss

GATE = ["gate.channel", "gate.token_scale", "gate.probe", "gate.probe_bias"]


def moved(amp) -> None:
    """Amplifier weights away from the identity, so every part changes the output."""
    torch.manual_seed(3)
    with torch.no_grad():
        amp.gate.channel.normal_(0, 0.3)
        amp.gate.token_scale.fill_(0.5)
        for module in amp.attn_bias.values():
            module.bias.normal_(0, 1.0)


def test_one_parameter_per_layer_each_reduced_once_per_backward():
    """With reentrant checkpointing each decoder layer's backward runs on its own, so a parameter read in k layers
    is accumulated k times in one backward (which ZeRO-2 rejects). Each amplifier parameter must be accumulated
    exactly once; a control parameter read in every layer shows the count would reveal sharing."""
    model, amp = micro_amplified(layers=4)
    moved(amp)
    assert [n for n, _ in amp.named_parameters()] == GATE + [f"attn_bias.{i}.bias" for i in range(4)]
    assert all(m.bias.shape == (4,) for m in amp.attn_bias.values())
    hf = model.get_base_model()
    hf.train()
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    hf.enable_input_require_grads()
    shared = torch.nn.Parameter(torch.zeros(()))  # the earlier layout: one tensor read in every biased layer
    handles = [layer.mlp.register_forward_hook(lambda m, a, out: out + shared * 0)
               for layer in hf.model.language_model.layers]
    counts: Counter = Counter()
    watched = dict(amp.named_parameters(), shared=shared)
    for name, param in watched.items():
        param.register_post_accumulate_grad_hook(lambda p, name=name: counts.update([name]))
    inputs, target = micro_batch()
    micro_loss(model, inputs, target).backward()
    for handle in handles:
        handle.remove()
    assert counts["shared"] == 4  # the check sees sharing: one accumulation per checkpointed layer
    assert {n: counts[n] for n in amp.state_dict()} == {n: 1 for n in amp.state_dict()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in amp.parameters())


def test_amplifier_runs_with_zero3_partitioned_parameters():
    """Every amplifier parameter empty except inside its owner's forward (ZeRO-3): the same outputs, because the
    gate and each layer's bias are read only in VisualGate.forward and AttentionBias.forward."""
    model, amp = micro_amplified()
    moved(amp)
    model.eval()
    inputs, _ = micro_batch()
    with torch.no_grad():
        want = model(**inputs).logits
        amp.enabled = False
        plain = model(**inputs).logits
        amp.enabled = True
    assert (want - plain).abs().max() > 1e-3  # the amplifier is not a no-op here
    want_stats = amp.stats()
    with fake_zero3(amp.modules()):
        assert amp.gate.channel.numel() == 0 and amp.attn_bias["2"].bias.numel() == 0  # really partitioned
        with torch.no_grad():
            got = model(**inputs).logits
        # No deepspeed to gather with: the parameter stats are skipped, not crashed on.
        assert amp.stats() == {"gate_gain_abs_dev": pytest.approx(want_stats["gate_gain_abs_dev"])}
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_stats_gather_partitioned_parameters_with_deepspeed():
    model, amp = micro_amplified()
    moved(amp)
    with torch.no_grad():
        model(**micro_batch()[0])
    want = amp.stats()
    assert set(want) >= {"attn_bias_absmax", "attn_bias_L3_mean", "gate_channel_abs_mean", "gate_token_scale"}
    with fake_zero3(amp.modules(), deepspeed=True):
        got = amp.stats()
        assert amp.gate.channel.numel() == 0  # released again after reading
    assert got == pytest.approx(want)


def test_save_uses_gathered_weights_and_never_writes_partitions(tmp_path):
    """Under ZeRO-3 the module's own tensors are empty: the save takes the full weights DeepSpeed hands over in the
    model's state dict, and without them writes no weights file rather than empty tensors."""
    import safetensors.torch

    from swift_plugins._amplifier import CONFIG_FILE, WEIGHTS_FILE

    _, amp = micro_amplified()
    moved(amp)
    full = {f"base_model.model.hr_amplifier.{k}": v.clone() for k, v in amp.state_dict().items()}
    with fake_zero3(amp.modules()):
        (tmp_path / "given").mkdir()
        amp.save(tmp_path / "given", state_dict=full)
        (tmp_path / "none").mkdir()
        amp.save(tmp_path / "none")
    saved = safetensors.torch.load_file(str(tmp_path / "given" / WEIGHTS_FILE))
    assert saved.keys() == amp.state_dict().keys()
    for key, value in amp.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    assert (tmp_path / "none" / CONFIG_FILE).exists() and not (tmp_path / "none" / WEIGHTS_FILE).exists()
