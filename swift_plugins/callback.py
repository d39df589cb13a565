"""Callback plugin (`--callbacks amplifier_stats`): the High-Risk Feature Amplifier's numbers in the logs.

At every logging step it adds, under `amp/`: how far the amplifier is from the identity — gate_gain_abs_dev (mean
|gain - 1| over the last batch's visual tokens), gate_channel_abs_mean (mean |c|), gate_token_scale (s),
attn_bias_absmax (max |β| over every biased layer and head) and, for each biased layer L,
attn_bias_L<L>_mean / attn_bias_L<L>_absmax (β over the heads) — and lr, the amplifier's learning rate at this step
(its own groups' with `--optimizer hr_amplifier`, else that of the group holding its parameters). They go wherever
swift's logs go: the console, logging.jsonl, trainer_state.json and tensorboard (`--report_to tensorboard`).
Without an amplifier in the model it does nothing.

Under DeepSpeed ZeRO-3 the parameters are read through deepspeed.zero.GatheredParameters (this runs on every rank);
where they are partitioned and deepspeed is not importable, only gate_gain_abs_dev and lr are logged.
"""
from __future__ import annotations

from swift.callbacks import TrainerCallback, callbacks_map
from swift.utils import get_logger

from swift_plugins._amplifier import find_amplifier

logger = get_logger()
AMP_GROUPS = ("hr_amplifier", "hr_amplifier_no_decay")  # swift_plugins/optimizer.py's group names


def amplifier_lr(optimizer, amplifier) -> float | None:
    """The amplifier's current learning rate: its named groups' (hr_amplifier optimizer), else the group that holds
    its parameters (any other optimizer without DeepSpeed), else None."""
    groups = getattr(optimizer, "param_groups", None) or []
    for group in groups:
        if group.get("name") in AMP_GROUPS:
            return float(group["lr"])
    ids = {id(p) for p in amplifier.parameters()}
    for group in groups:
        if any(id(p) in ids for p in group["params"]):
            return float(group["lr"])
    return None


class AmplifierStatsCallback(TrainerCallback):

    def on_train_begin(self, args, state, control, **kwargs):
        if find_amplifier(self.trainer.model) is None:
            logger.warning("amplifier_stats: the model has no High-Risk Feature Amplifier; nothing to log")

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after HF decided whether this step logs and before swift's log() collects custom_metrics.
        if not control.should_log:
            return
        amplifier = find_amplifier(self.trainer.model)
        if amplifier is None:
            return
        metrics = self.trainer.custom_metrics["train"]
        stats = amplifier.stats()
        lr = amplifier_lr(getattr(self.trainer, "optimizer", None), amplifier)
        if lr is not None:
            stats["lr"] = lr
        for name, value in stats.items():
            metrics[f"amp/{name}"].update(value)


callbacks_map["amplifier_stats"] = AmplifierStatsCallback
