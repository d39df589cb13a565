"""Callback plugin (`--callbacks amplifier_stats`): the High-Risk Feature Amplifier's numbers in the logs.

At every logging step it adds, under `amp/`: gate_channel_abs_mean (mean |c|), gate_token_scale (s),
gate_gain_abs_dev (mean |gain - 1| over the last batch's visual tokens: how far the gate is from the identity),
and for each biased layer L attn_bias_L<L>_mean / attn_bias_L<L>_absmax (β over the heads). They go wherever
swift's logs go: the console, logging.jsonl, trainer_state.json and tensorboard (`--report_to tensorboard`).
Without an amplifier in the model it does nothing.
"""
from __future__ import annotations


from swift.callbacks import TrainerCallback, callbacks_map
from swift.utils import get_logger

from swift_plugins._amplifier import find_amplifier

logger = get_logger()


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
        for name, value in amplifier.stats().items():
            metrics[f"amp/{name}"].update(value)


callbacks_map["amplifier_stats"] = AmplifierStatsCallback
