"""swift_plugins/callback.py (amplifier_stats): the amplifier's numbers in every log of a training run."""
from __future__ import annotations

from types import SimpleNamespace


def test_training_logs_the_amplifier(trained):
    logs = trained.result["log_history"]
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) == 4
    for key in ("amp/gate_gain_abs_dev", "amp/gate_token_scale", "amp/attn_bias_L0_mean", "amp/attn_bias_L2_absmax"):
        assert all(key in entry for entry in train_logs), key
    assert train_logs[-1]["amp/gate_gain_abs_dev"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = trained.run.glob("runs/events.out.tfevents*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/amp/attn_bias_L1_mean", "train/amp/gate_gain_abs_dev", "eval/weighted_f1"} <= tags


def test_without_an_amplifier_the_callback_does_nothing(loaded):
    from swift_plugins.callback import AmplifierStatsCallback

    metrics: dict = {}
    callback = AmplifierStatsCallback(None, SimpleNamespace(model=loaded[0], custom_metrics={"train": metrics}))
    callback.on_train_begin(None, None, SimpleNamespace())  # a warning, no error
    callback.on_step_end(None, None, SimpleNamespace(should_log=True))
    assert metrics == {}
