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
eagerly with torch's warning. The first step carries the compile time (~35 s on the GPU for the 7B or the 3B).
Dynamo's warning that it cannot read which inputs liger's Triton kernels write shows once, without its traceback.

Measured (bench/README.md, run L, one H200): stage 2 (3B) 8.29 -> 10.71 samples/s and 15.3 -> 14.7 GiB, stage 1 (7B)
6.08 -> 6.56 samples/s, same memory; recipes/real.env turns it on. Under DeepSpeed ZeRO-3, whose parameter hooks run
inside every layer, it is not tried: the layers stay eager, with a warning.
Knob (environment, read when swift prepares the model): FIRESAFE_COMPILE_LAYERS  0 (default here; real.env: 1) | 1
"""
from __future__ import annotations

import logging

from swift_plugins._patching import install_on_swift, switch
from swift_plugins._zero import any_zero3

ENV = "FIRESAFE_COMPILE_LAYERS"


def wanted() -> bool:
    return switch(ENV, "compiled decoder layers in training")


def compile_decoder_layers(model) -> int:
    """Compile the language model's decoder layers in place for training; returns how many (0 under ZeRO-3)."""
    import torch._inductor.config

    from tools.model.speedups import SpeedupError, compile_in_place, decoder_layers

    try:
        layers = decoder_layers(model)
    except SpeedupError:
        raise ValueError(f"{ENV}=1: no language_model.layers in {type(model).__name__} (Qwen2.5-VL only)") from None
    if any_zero3(p for layer in layers for p in layer.parameters()):
        return 0
    quiet_triton_access_warnings()
    torch._inductor.config.fallback_random = True  # eager's dropout masks: recompute must draw the same ones
    # training, evaluation and checkpoint recompute are separate graphs of the shared layer code;
    # dynamic=None (torch's default): sequence lengths vary, so shapes turn dynamic at the first new one
    return compile_in_place(layers, dynamic=None)


class _TritonAccessWarningOnce(logging.Filter):
    """Dynamo warns, with a full traceback, each time it cannot read which inputs a user Triton kernel writes (torch
    2.11 fails on liger's SwiGLU and RMSNorm kernels inside the compiled layers); it then treats every input as
    written, which is correct. A 7B + 3B training run logged 12 such tracebacks, 132 lines (bench/README.md, run AC).
    The first warning stays, without its traceback; the repeats go."""

    PREFIX = "Encountered an exception in identify_"  # identify_mutated_tensors (torch 2.11), _accessed_ (2.14)

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.PREFIX):
            return True
        if self.seen:
            return False
        self.seen = True
        record.exc_info, record.exc_text = None, None
        record.msg = f"{record.msg} (repeats and tracebacks hidden: swift_plugins/patches/compile_layers.py)"
        return True


def quiet_triton_access_warnings() -> None:
    """Install _TritonAccessWarningOnce on the logger dynamo warns through (once per process)."""
    log = logging.getLogger("torch._dynamo")
    if not any(isinstance(f, _TritonAccessWarningOnce) for f in log.filters):
        log.addFilter(_TritonAccessWarningOnce())


def _prepare_gradient_checkpointing(self, model) -> None:
    _prepare_gradient_checkpointing.__wrapped_original__(self, model)
    if wanted():
        from swift.utils import get_logger

        compiled = compile_decoder_layers(model)
        if compiled:
            get_logger().info(f"{ENV}=1: {compiled} decoder layers compiled for training")
        else:
            get_logger().warning(f"{ENV}=1: not under DeepSpeed ZeRO-3 (its hooks gather each layer's parameters; "
                                 f"untried with compiled layers): the layers run eagerly")


def apply() -> None:
    install_on_swift("_prepare_gradient_checkpointing", _prepare_gradient_checkpointing)


wanted()  # a bad value fails at import, before the model loads
apply()
