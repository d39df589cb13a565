"""Patch (on import): LoRA trained on float8 copies of the language model's frozen weights, FIRESAFE_FP8_BASE=1.

Why: stage 1 (the 7B) is GPU-bound, and half of its step is the language model's matrix products, already near the
bf16 peak (bench/README.md, runs L and T). The base weights are frozen, so each of the three passes (forward,
checkpointing's recompute, the input gradient) can run float8 products instead (tools/model/fp8.py), and the
weights take half the memory (the 7B's 196 projections free 6.1 GiB), room for layers kept without recompute.

How: when swift starts training (SwiftMixin.train), every frozen nn.Linear inside the language model's decoder layers
(PEFT's `base_layer` under each LoRA layer, and any projection left without an adapter) is replaced by an Fp8Linear
built from its weight; the LoRA matrices, the vision tower, the embeddings and the LM head stay as they are. The
checkpoint holds the adapter only, as before, and test.sh scores it on the bf16 weights (or SCORE_FP8=1).

What it changes: the adapter learns against weights and activations rounded to ~3 significant bits, so its loss
differs from bf16 training by that rounding; bench/README.md ("Float8 base weights in training") has the measured
speed and memory, and what it did to the demo's scores. Opt-in per stage: FP8_BASE_STAGE1 / FP8_BASE_STAGE2 in the
recipe, which train.sh exports as this variable for each stage. Needs float8 matmuls: a GPU of compute capability
>= 8.9 (Ada, Hopper) or a CPU (torch's float8 matmul: the tests and the demo); the preflight checks. Not under
DeepSpeed ZeRO-3 (its partitioned weights are gathered per forward): the layers stay bf16, with a warning. Under
DDP the float8 copies are each process's own (made from the same weights) and left out of DDP's buffer broadcast,
which fails on them otherwise (tests/model/test_ddp.py, two CPU processes; not yet run on several GPUs).
Knob (environment, read when training starts): FIRESAFE_FP8_BASE  0 (default) | 1
"""
from __future__ import annotations

import torch

from swift_plugins._patching import install_on_swift, switch
from swift_plugins._zero import any_zero3

ENV = "FIRESAFE_FP8_BASE"


def wanted() -> bool:
    return switch(ENV, "frozen language-model weights in float8 for training")


def convert(model: torch.nn.Module) -> tuple[int, int]:
    """Replace the frozen linear layers of the language model's decoder layers by float8 ones, in place.
    Returns (layers replaced, bytes of weights freed); (0, 0) under ZeRO-3."""
    from tools.model.fp8 import fits, swap_in
    from tools.model.speedups import SpeedupError, decoder_layers

    try:
        layers = decoder_layers(model)
    except SpeedupError:
        raise ValueError(f"{ENV}=1: no language_model.layers in {type(model).__name__} (Qwen2.5-VL only)") from None
    if any_zero3(p for layer in layers for p in layer.parameters()):
        return 0, 0
    replaced = freed = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear or module.weight.requires_grad or not fits(module):
                continue
            swap_in(layer, name)
            replaced += 1
            freed += module.weight.numel() * (module.weight.element_size() - 1)
    return replaced, freed


def ignore_in_ddp(model: torch.nn.Module) -> None:
    """Leave the float8 layers' buffers out of DDP's broadcast (DDP reads this attribute of the module it wraps)."""
    from tools.model.fp8 import Fp8Linear

    names = [f"{prefix}.{buffer}" for prefix, module in model.named_modules() if isinstance(module, Fp8Linear)
             for buffer, _ in module.named_buffers(recurse=False)]
    model._ddp_params_and_buffers_to_ignore = [*getattr(model, "_ddp_params_and_buffers_to_ignore", []), *names]


def train(self, *args, **kwargs):
    if wanted():
        from swift.utils import get_logger

        model = self.accelerator.unwrap_model(self.model)
        replaced, freed = convert(model)
        if replaced:
            ignore_in_ddp(model)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the bf16 weights' blocks back to the GPU
            get_logger().info(f"{ENV}=1: {replaced} frozen language-model linear layers in float8 "
                              f"({freed / 2**30:.2f} GiB of weights freed)")
        else:
            get_logger().warning(f"{ENV}=1: no layer converted (under DeepSpeed ZeRO-3 the weights are partitioned; "
                                 f"untried in float8): the layers stay in {model.dtype}")
    return train.__wrapped_original__(self, *args, **kwargs)


def apply() -> None:
    install_on_swift("train", train)


wanted()  # a bad value fails at import, before the model loads
apply()
