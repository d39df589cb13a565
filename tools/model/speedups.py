"""Scoring speed-ups applied to a loaded model (tools.model.infer.load), each a knob; what each costs in probability
and gains in speed is measured in bench/README.md ("Scoring levers", bench/score_levers.py):

  SCORE_MERGE          the LoRA adapter folded into the base weights: one matmul per linear layer instead of three.
                       auto (default): for a bf16/fp16 model on CUDA (+13 % on the 7B, +14 % on the 3B); 0; 1
  SCORE_COMPILE_LLM    the language model's decoder layers compiled (torch.compile, one graph per input shape that
                       every layer shares): its RMSNorm, rotary and SwiGLU chains become fused kernels. auto
                       (default): on CUDA when the vision kernels are compiled too (SCORE_COMPILE: large test sets),
                       a graph only for an input shape (image token count) that at least SCORE_COMPILE_MIN_IMAGES
                       (800) images have, the rest eager; 0; 1: a graph for every shape
  SCORE_FP8            1: the language model's linear layers in float8 e4m3 (a scale per output channel and one per
                       token; CUDA compute capability >= 8.9: Ada, Hopper), after merging the adapter. 0 (default)

None of them changes what is computed, only the rounding: merging rounds W + BA to bf16 once (on a trained model the
answers did not change; on random weights it moves probabilities about as much as a change of batch size does),
float8 keeps ~3 significant bits per weight and activation with per-row scales (it changed the answer for 1 of 300
images of the trained demo model, and moves random-weight probabilities ten times as far): opt-in.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch

from tools.model.fp8 import Fp8Linear, supported, swap_in

# The language model's projections (the vision tower and the LM head stay as they are): the names in
# Qwen2.5-VL's decoder layers, under any wrapper (PEFT's base_model.model..., swift's).
LLM_LINEAR = re.compile(r"(^|\.)language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")


class SpeedupError(RuntimeError):
    """A speed-up knob this machine or model cannot honour (reported in one line by the scoring CLI)."""


DEFAULTS = {"SCORE_MERGE": "auto", "SCORE_COMPILE_LLM": "auto", "SCORE_FP8": "0"}


def knob(name: str) -> str:
    """A knob's value from the environment ("auto", "0" or "1"; unset = its default); anything else is an error
    that names it."""
    value = os.environ.get(name, DEFAULTS[name]).strip().lower()
    allowed = ("0", "1") if DEFAULTS[name] != "auto" else ("auto", "0", "1")
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected {', '.join(allowed[:-1])} or {allowed[-1]}")
    return value


def policy() -> dict[str, str]:
    """The knobs as set (what a probability file records: another setting scores again)."""
    return {name: knob(name) for name in ("SCORE_MERGE", "SCORE_FP8")}


def on_cuda(model) -> bool:
    """Whether the model's weights are on a CUDA device (a model without a device: no)."""
    device = getattr(model, "device", None)
    return getattr(device, "type", "cpu") == "cuda"


def half_precision_on_cuda(model) -> bool:
    """A bf16/fp16 model on CUDA: where merging pays, and where scoring runs under autocast (tools.model.infer)."""
    return on_cuda(model) and getattr(model, "dtype", None) in (torch.bfloat16, torch.float16)


def merge_wanted(model) -> bool:
    """SCORE_FP8=1 merges (float8 needs plain linear layers); else SCORE_MERGE=1 merges, and auto merges a
    bf16/fp16 model on CUDA, where the third matmul costs time; a float32 model on a CPU (the demo) keeps its
    adapter exact."""
    if knob("SCORE_FP8") == "1":
        return True
    value = knob("SCORE_MERGE")
    return half_precision_on_cuda(model) if value == "auto" else value == "1"


def compile_wanted(model) -> bool:
    """SCORE_COMPILE_LLM=1 compiles; auto compiles on CUDA unless the process turned compiling off
    (tools.model.infer.choose_compile sets FIRESAFE_COMPILE=off for small test sets: ~5 s of compiling is not
    worth it there); CPU compiling takes longer than the demo's scoring."""
    value = knob("SCORE_COMPILE_LLM")
    if value == "auto":
        return on_cuda(model) and os.environ.get("FIRESAFE_COMPILE", "auto").strip().lower() != "off"
    return value == "1"


def merge_lora(model):
    """The LoRA adapter folded into the base weights (PEFT's merge_and_unload): one matmul per linear layer instead
    of three. The High-Risk Feature Amplifier is not LoRA: its hooks live on the base model's modules and stay."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def decoder_layers(model) -> list:
    """The language model's decoder layers (Qwen2.5-VL: ...language_model.layers), under any wrapper."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and re.search(r"(^|\.)language_model\.layers$", name):
            return list(module)
    raise SpeedupError("no language_model.layers in this model: SCORE_COMPILE_LLM / SCORE_FP8 know Qwen2.5-VL only")


def compile_layers(model) -> int:
    """Compile each decoder layer in place for scoring, static shapes (they are few: rows are bucketed by image
    size). Returns how many."""
    return compile_in_place(decoder_layers(model), dynamic=False)


def compile_min_images() -> int:
    """SCORE_COMPILE_MIN_IMAGES (default 800): the images that pay for compiling, for the vision kernels of a
    scoring process (tools.model.infer.choose_compile) and for each input shape's graph of the decoder layers
    (graph_min_images)."""
    return int(os.environ.get("SCORE_COMPILE_MIN_IMAGES", "800"))


def graph_min_images() -> int:
    """Images of one input shape that pay for compiling the decoder layers' graph for it (tools.model.infer.
    graph_batches): SCORE_COMPILE_LLM=1 every shape (0); else compile_min_images() (on an H200 a graph takes ~3 s
    to compile with inductor's cache cold and saves ~2.7 ms per image on the 7B, ~2.2 on the 3B: bench/README.md)."""
    if knob("SCORE_COMPILE_LLM") == "1":
        return 0
    return compile_min_images()


def graph_shapes(model) -> set:
    """The input shapes this process has run the model's compiled layers on (tools.model.infer.score_rows records
    them): their graphs exist, so later batches of those shapes use them at no compiling cost."""
    return model.__dict__.setdefault("_firesafe_graph_shapes", set())


@contextmanager
def eager_layers(model):
    """Inside, the model's compiled modules run their eager code (their compiled calls are set aside and put back
    after): a batch of a shape too rare to pay for a graph."""
    modules = compiled_modules(model)
    calls = [m._compiled_call_impl for m in modules]
    for m in modules:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, call in zip(modules, calls):
            m._compiled_call_impl = call


def compiled_modules(model) -> list:
    """The model's modules compiled in place (nn.Module.compile: compile_in_place)."""
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def has_compiled_layers(model) -> bool:
    """Whether any of the model's modules was compiled in place."""
    return bool(compiled_modules(model))


def compile_in_place(layers: list, dynamic: bool | None) -> int:
    """nn.Module.compile on each layer (scoring, and training's swift_plugins/patches/compile_layers.py): the layers
    share one code object, so one graph per input shape (and mode) serves all of them. dynamic: torch.compile's."""
    import torch._dynamo

    # one graph per shape and mode for all layers: allow a few (a smaller last batch, another image size)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    # a graph that fails to compile runs eagerly (with torch's warning) instead of stopping the run
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)


def to_fp8(model, check_device: bool = True) -> int:
    """Replace the language model's linear layers (LLM_LINEAR) by float8 ones in place; the adapter must be merged
    first. Returns how many were replaced (0: already float8). check_device=False lets tests run torch's CPU float8 matmul."""
    if check_device and (why := supported()):
        raise SpeedupError(f"SCORE_FP8=1: {why}; run test.sh with SCORE_FP8=0")
    matched = replaced = 0
    for name, module in list(model.named_modules()):
        if not LLM_LINEAR.search(name):
            continue
        matched += 1
        if isinstance(module, Fp8Linear):
            continue  # already float8
        if type(module) is not torch.nn.Linear:
            raise SpeedupError(f"SCORE_FP8=1: {name} is a {type(module).__name__}, not a plain linear layer "
                               "(merge the adapter first)")
        swap_in(model, name)
        replaced += 1
    if not matched:
        raise SpeedupError("SCORE_FP8=1: no language-model linear layers found")
    return replaced


def apply(model, merge: bool | None = None):
    """The model with the knobs' speed-ups applied (merge: override SCORE_MERGE); the adapter-free model is
    returned when merged, the same object otherwise."""
    if merge_wanted(model) if merge is None else merge:
        model = merge_lora(model)
    if knob("SCORE_FP8") == "1":
        to_fp8(model)
    if compile_wanted(model):
        compile_layers(model)
    return model
