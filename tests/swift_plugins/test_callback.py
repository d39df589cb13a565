"""swift_plugins/callback.py (amplifier_stats): the amplifier's numbers in every log of a training run."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_training_logs_the_amplifier(trained):
    logs = trained.result["log_history"]
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) == 4
    for key in ("amp/gate_gain_abs_dev", "amp/gate_token_scale", "amp/attn_bias_L0_mean", "amp/attn_bias_L2_absmax",
                "amp/attn_bias_absmax", "amp/lr"):
        assert all(key in entry for entry in train_logs), key
    assert train_logs[-1]["amp/gate_gain_abs_dev"] > 0
    for entry in train_logs:
        assert entry["amp/attn_bias_absmax"] == max(entry[f"amp/attn_bias_L{i}_absmax"] for i in range(3))
        # The amplifier's own rate (default 1e-2) under the same schedule as the LoRA's (5e-3, logged by HF).
        assert entry["amp/lr"] == pytest.approx(entry["learning_rate"] * 1e-2 / 5e-3, rel=1e-6)
    assert train_logs[0]["amp/lr"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = trained.run.glob("runs/events.out.tfevents*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/amp/attn_bias_L1_mean", "train/amp/gate_gain_abs_dev", "train/amp/lr", "eval/weighted_f1",
            "eval/high_risk_auc"} <= tags


def test_without_an_amplifier_the_callback_does_nothing(loaded):
    from swift_plugins.callback import AmplifierStatsCallback

    metrics: dict = {}
    callback = AmplifierStatsCallback(None, SimpleNamespace(model=loaded[0], custom_metrics={"train": metrics}))
    callback.on_train_begin(None, None, SimpleNamespace())  # a warning, no error
    callback.on_step_end(None, None, SimpleNamespace(should_log=True))
    assert metrics == {}


def test_amplifier_rate_from_any_optimizer():
    """Named hr_amplifier groups first; else the group holding the amplifier's parameters (swift's default
    optimizer); else nothing (e.g. DeepSpeed's flat buffers without names)."""
    from swift_plugins.callback import amplifier_lr
    from tests.swift_plugins.support import micro_amplified

    model, amp = micro_amplified(layers=1)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    named = torch.optim.AdamW([{"params": lora, "lr": 1e-4, "name": "base"},
                               {"params": list(amp.parameters()), "lr": 2e-2, "name": "hr_amplifier"}])
    assert amplifier_lr(named, amp) == 2e-2
    mixed = torch.optim.AdamW([{"params": lora + list(amp.parameters()), "lr": 3e-4}])
    assert amplifier_lr(mixed, amp) == 3e-4
    assert amplifier_lr(torch.optim.AdamW(lora, lr=1e-4), amp) is None and amplifier_lr(None, amp) is None
