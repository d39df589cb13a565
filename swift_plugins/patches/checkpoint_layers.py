"""Patch (on import): gradient checkpointing for only some of the language model's decoder layers.

`--gradient_checkpointing true` recomputes every decoder layer in the backward; `false` keeps every layer's
activations (the 7B at batch 4 and 1,365 tokens: ~1.2 GiB a layer, 53 GiB in all). FIRESAFE_CKPT_SKIP_LAYERS=N
keeps the activations of the last N layers and recomputes the others, trading memory for time layer by layer
(bench/README.md has the measured steps). transformers' `gradient_checkpointing_enable` turns the flag on for
every layer; the wrapper below turns it off again for the last N layers of the language model (the longest list
of checkpointable layers outside the vision tower). Nothing changes with N = 0 (the default) or without
gradient checkpointing.

Knob (environment, read at each gradient_checkpointing_enable): FIRESAFE_CKPT_SKIP_LAYERS  a whole number >= 0
"""
from __future__ import annotations

import os

from torch import nn
from transformers import PreTrainedModel

from swift_plugins._patching import install

ENV = "FIRESAFE_CKPT_SKIP_LAYERS"


def skip_layers() -> int:
    text = os.environ.get(ENV, "0").strip() or "0"
    if not text.isdigit():
        raise ValueError(f"{ENV}={text!r}: expected a whole number >= 0 (decoder layers kept without recompute)")
    return int(text)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The language model's decoder layers: the longest ModuleList of checkpointable layers not in a vision tower."""
    found = [m for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(x, "gradient_checkpointing") for x in m)
             and "visual" not in name and "vision" not in name]
    return max(found, key=len) if found else None


def uncheckpoint_last(model: nn.Module, n: int) -> int:
    """Turn checkpointing off for the last n decoder layers; returns how many were on and now are off."""
    layers = decoder_layers(model)
    if layers is None or n <= 0:
        return 0
    changed = 0
    for layer in list(layers)[-n:]:
        changed += bool(layer.gradient_checkpointing)
        layer.gradient_checkpointing = False
    return changed


def gradient_checkpointing_enable(self, *args, **kwargs):
    gradient_checkpointing_enable.__wrapped_original__(self, *args, **kwargs)
    n = skip_layers()
    if n:
        changed = uncheckpoint_last(self, n)
        from swift.utils import get_logger

        get_logger().info(f"{ENV}={n}: the last {changed} decoder layers keep their activations (no recompute)")


def apply() -> None:
    install(PreTrainedModel, "gradient_checkpointing_enable", gradient_checkpointing_enable)


skip_layers()  # a bad value fails at import, before the model loads
apply()
