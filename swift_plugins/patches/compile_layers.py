"""Patch (on import): the language model's decoder layers compiled for training, FIRESAFE_COMPILE_LAYERS=1.

Why: stage 2 (the 3B) spends ~0.6 s of a 2.2 s optimizer step with the GPU waiting for Python to launch kernels
(bench/README.md, runs H-J: liger removed GPU work and the step still got longer). Each decoder layer launches on the
order of a hundred kernels per pass (PEFT's LoRA side paths, rotary, RMSNorm, SwiGLU), three passes per step with
recompute; compiled, a layer's element-wise chains become a few fused kernels.

How: swift prepares gradient checkpointing once per trainer (SwiftMixin._prepare_gradient_checkpointing, with or
without checkpointing); the wrapper below then compiles every decoder layer in place (nn.Module.compile, as test.sh's
SCORE_COMPILE_LLM does), so transformers' checkpointing wraps the compiled call. Dropout masks come from PyTorch's
own random ops (torch._inductor.config.fallback_random), so a recomputed layer draws the masks its forward drew and
the gradients equal eager ones (tests/swift_plugins/test_compile_layers.py, reentrant and not). Shapes turn dynamic
at the first new sequence length, so batches of other lengths share a graph; a graph that fails to compile runs
eagerly with torch's warning. The first steps carry the compile time (tens of seconds on a CPU even for a toy model).

Not yet measured on a GPU (bench/README.md has the command), so off by default. Not tried with DeepSpeed ZeRO-3,
whose parameter hooks run inside every layer.
Knob (environment, read when swift prepares the model): FIRESAFE_COMPILE_LAYERS  0 (default) | 1
"""
from __future__ import annotations

import os

from swift_plugins._patching import install

ENV = "FIRESAFE_COMPILE_LAYERS"


def wanted() -> bool:
    text = (os.environ.get(ENV) or "0").strip()
    if text not in ("0", "1"):
        raise ValueError(f"{ENV}={text!r}: expected 0 or 1 (compiled decoder layers in training)")
    return text == "1"


def compile_decoder_layers(model) -> int:
    """Compile the language model's decoder layers in place for training; returns how many."""
    import torch._dynamo
    import torch._inductor.config

    from tools.model.speedups import SpeedupError, decoder_layers

    try:
        layers = decoder_layers(model)
    except SpeedupError:
        raise ValueError(f"{ENV}=1: no language_model.layers in {type(model).__name__} (Qwen2.5-VL only)") from None
    torch._inductor.config.fallback_random = True  # eager's dropout masks: recompute must draw the same ones
    # training, evaluation and checkpoint recompute are separate graphs of the one shared layer code
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
    for layer in layers:
        layer.compile()
    return len(layers)


def _prepare_gradient_checkpointing(self, model) -> None:
    _prepare_gradient_checkpointing.__wrapped_original__(self, model)
    if wanted():
        from swift.utils import get_logger

        get_logger().info(f"{ENV}=1: {compile_decoder_layers(model)} decoder layers compiled for training")


def apply() -> None:
    try:
        from swift.trainers.mixin import SwiftMixin
    except ImportError:  # swift itself is what loads this file; nothing to patch without it
        return
    install(SwiftMixin, "_prepare_gradient_checkpointing", _prepare_gradient_checkpointing)


wanted()  # a bad value fails at import, before the model loads
apply()
