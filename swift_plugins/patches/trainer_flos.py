"""Patch (on import): HF Trainer's floating-point-operation count reuses the model's parameter count.

Why: after every micro-step the Trainer adds `6 x tokens x model.num_parameters(exclude_embeddings=True)` to
`state.total_flos` (only reported in the logs). `num_parameters` walks every module and parameter of the model, 3,361
modules and 1,328 parameters for Qwen2.5-VL-3B with LoRA: 8.6 ms of Python per micro-step on a 2-core AMD EPYC, time
in which the GPU runs dry after a sync (bench/README.md, "Stage 2: where the GPU waits"). The count cannot change while a model
trains, so it is taken once per model and reused; the total is the same number.

How: Trainer.floating_point_ops keeps transformers' formula, with the count cached on the trainer and keyed by the
model object (a model swapped in, e.g. by a callback, is counted again).
"""
from __future__ import annotations

from swift_plugins._patching import install


def floating_point_ops(self, inputs) -> int:
    model = self.model
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input not in inputs or not hasattr(model, "num_parameters"):
        return 0
    cached = getattr(self, "_firesafe_num_parameters", None)
    if cached is None or cached[0] is not model:
        cached = (model, model.num_parameters(exclude_embeddings=True))
        self._firesafe_num_parameters = cached
    return 6 * inputs[main_input].numel() * cached[1]


def apply() -> None:
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover - transformers is swift's dependency
        return
    install(Trainer, "floating_point_ops", floating_point_ops)


apply()
