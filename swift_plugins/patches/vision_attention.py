"""Faster Qwen2.5-VL vision tower without flash-attn: patched on import (an ms-swift `--external_plugins` file).

Without flash-attn, transformers' `Qwen2_5_VLVisionAttention.forward` splits the patch sequence at
`cu_seqlens` and calls attention once per window in a Python loop: 80 windows per 1,280-token image in each
of 28 windowed layers, plus a host sync per layer. With the changes below the 7B vision tower takes 73 ms
instead of 380 ms for 4 images on an H200, and a 7B LoRA training step 2.1x less time (bench/README.md).
The attention loop is replaced by

- on CUDA with `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10): one variable-length call per layer;
  the 4 full-attention layers, when every image of the batch has the same patch count (phone photos at one
  MAX_PIXELS do), as one batched SDPA call preferring cuDNN's kernel (1.7x the varlen kernel's speed there);
- otherwise (CPU, older torch): one batched `scaled_dot_product_attention` call per distinct window length.
  The windows of one length are gathered into a batch; nothing is padded or masked, so each window sees
  exactly the keys it saw before. On CPU (fp32) the output equals the loop's (tests/test_vision_attention.py).

More patches, each measured on an H200 (bench/README.md):

- Vision MLP: its intermediate size 3,420 is not a multiple of 8 elements in bf16, so the rows of the
  [tokens, 3420] activations are not 16-byte aligned and cuBLAS falls back from Hopper (TMA) kernels to an
  sm80 kernel at ~230 TFLOP/s (75 ms of a 165 ms vision forward for 4 images). The frozen tower's gate/up
  weights are re-stored with zero rows up to a multiple of 64 (the parameters keep their shape: they are views
  of the padded storage) and down_proj gets a zero-padded copy (280 MB for the 32-layer tower); the zero
  lanes add exact zeros. Only without autograd through the MLP (frozen tower) and only on CUDA.
- PEFT LoRA layers cast their input to the adapter's dtype (fp32 adapters on a bf16 model): under autocast
  the product runs in bf16 anyway, so the cast is a pure copy (two per LoRA layer and step, and their
  backward). Under autocast the cast is skipped; the result is the same, as autocast casts fp32 -> bf16 again.
- torch.compile (FIRESAFE_COMPILE) of the fp32 elementwise chains (vision rotary, RMSNorm, vision SiLU*up)
  wherever no gradient flows: the frozen tower, every layer at inference, and the no-grad first pass of
  (reentrant) checkpointed LLM layers, whose backward recomputes them eagerly.

It also replaces the patch embedding's `Conv3d` (kernel == stride, one patch per output) by the equivalent
matrix product: cuDNN picks very slow kernels for that shape in bf16 on some versions (transformers #45750).

Knobs (environment variables, read at import):
  FIRESAFE_VISION_ATTN   auto (default: varlen on CUDA, batched sdpa elsewhere) | varlen | sdpa | off
  FIRESAFE_PATCH_EMBED   linear (default) | conv (transformers' Conv3d)
  FIRESAFE_VISION_MLP    auto (default: padded on CUDA when misaligned) | pad (always) | off
  FIRESAFE_LORA_CAST     auto (default: no input cast under autocast) | always (PEFT's behaviour)
  FIRESAFE_COMPILE       auto (default: on CUDA) | on | off; inductor, cached per machine; any compile error
                         falls back to eager (tools/model/infer.py turns it off for small test sets)
  FIRESAFE_COMPILE_DIMS  tokens (default: only the token/batch sizes symbolic in the compiled kernels) | all
                         (torch.compile(dynamic=True): head and hidden sizes symbolic too, slower kernels)
  FIRESAFE_LONG_ATTN     cudnn (default: the full-attention layers, when every image of the batch has the same
                         patch count, through SDPA preferring cuDNN's kernel) | varlen (varlen_attn there too)
The model's own attention implementation is left alone unless it is "sdpa" (the default without
flash-attn): with flash_attention_2 transformers already does one varlen call.

DeepSpeed ZeRO-3: a parameter is an empty partition outside the forward of the module that owns it (DeepSpeed
gathers a module's own parameters around its forward only). The patch embedding as a matmul reads `proj.weight`
without calling `proj`, and the padded vision MLP reads and re-stores the three projections' weights without calling
them, so both fall back to transformers' original forward (which calls those submodules) whenever a parameter they
would read is managed by ZeRO-3 (a DeepSpeed `ds_id`/`ds_numel` attribute, or numel 0; swift_plugins/_zero.py).
The attention rewrite calls `qkv` and `proj` as modules and the RMSNorm reads only its own weight, so they stay on.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from swift_plugins._patching import original_of
from swift_plugins._zero import any_zero3

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch version
    varlen_attn = None



CHOICES = {  # each knob's accepted values, the default first
    "FIRESAFE_VISION_ATTN": ("auto", "varlen", "sdpa", "off"),
    "FIRESAFE_LONG_ATTN": ("cudnn", "varlen"),
    "FIRESAFE_PATCH_EMBED": ("linear", "conv"),
    "FIRESAFE_VISION_MLP": ("auto", "pad", "off"),
    "FIRESAFE_LORA_CAST": ("auto", "always"),
    "FIRESAFE_COMPILE": ("auto", "on", "off"),
    "FIRESAFE_COMPILE_DIMS": ("tokens", "all"),
}


def knob(name: str, value: str | None = None) -> str:
    """`value`, else the environment's, else the default; refused unless one of CHOICES[name]."""
    got = (value if value is not None else os.environ.get(name, CHOICES[name][0])).strip().lower()
    if got not in CHOICES[name]:
        raise ValueError(f"{name}={got!r}: expected one of {', '.join(CHOICES[name])}")
    return got


MODE, LONG_ATTN, PATCH_EMBED = knob("FIRESAFE_VISION_ATTN"), knob("FIRESAFE_LONG_ATTN"), knob("FIRESAFE_PATCH_EMBED")
VISION_MLP, LORA_CAST = knob("FIRESAFE_VISION_MLP"), knob("FIRESAFE_LORA_CAST")
COMPILE, COMPILE_DIMS = knob("FIRESAFE_COMPILE"), knob("FIRESAFE_COMPILE_DIMS")

ORIGINAL_ATTENTION_FORWARD = original_of(qwen.Qwen2_5_VLVisionAttention.forward)
ORIGINAL_PATCH_EMBED_FORWARD = original_of(qwen.Qwen2_5_VisionPatchEmbed.forward)
ORIGINAL_MLP_FORWARD = original_of(qwen.Qwen2_5_VLMLP.forward)
ORIGINAL_NORM_FORWARD = original_of(qwen.Qwen2_5_VLRMSNorm.forward)
ORIGINAL_ROTARY = qwen.apply_rotary_pos_emb_vision
MLP_ALIGN = 64  # elements: 128 bytes in bf16
# The full-attention layers' segments (one per image) are thousands of patches long, the windowed layers' 64:
# cuDNN's kernel wins only on the long ones, so only segments this long go through it.
LONG_SEGMENT = 1024
_LONG_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


def _segments(cu_seqlens: torch.Tensor) -> tuple[list[int], int]:
    """(lengths, max length) of the segments, computed once per cu_seqlens tensor (one host sync per forward
    instead of one per layer: every layer of a forward pass receives the same tensor object)."""
    cached = getattr(cu_seqlens, "_firesafe_segments", None)
    if cached is None:
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        cached = (lengths, max(lengths, default=0))
        try:
            cu_seqlens._firesafe_segments = cached
        except (AttributeError, RuntimeError):  # e.g. under tracing
            pass
    return cached


def _equal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    """Attention within consecutive segments of `length` tokens (q, k, v: [tokens, heads, dim]; so is the result)
    as one batched SDPA call on views: nothing gathered or padded."""
    tokens, heads, dim = q.shape
    qb, kb, vb = (t.reshape(tokens // length, length, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=0.0, is_causal=False, scale=scaling)
    return out.transpose(1, 2).reshape(tokens, heads, dim)


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """Attention within each segment; q, k, v are [tokens, heads, dim] and so is the result."""
    lengths, _ = _segments(cu_seqlens)
    tokens, heads, dim = q.shape
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n:
            by_length.setdefault(n, []).append(i)
    if len(by_length) == 1:  # all segments the same length: a view, no gather
        (n, _), = by_length.items()
        return _equal_sdpa(q, k, v, n, scaling)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    out = q.new_empty(q.shape)
    for n, segs in by_length.items():
        index = (torch.tensor([starts[s] for s in segs], device=q.device)[:, None]
                 + torch.arange(n, device=q.device)).reshape(-1)
        qb, kb, vb = (t.index_select(0, index).reshape(len(segs), n, heads, dim).transpose(1, 2) for t in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=0.0, is_causal=False, scale=scaling)
        out.index_copy_(0, index, ob.transpose(1, 2).reshape(-1, heads, dim))
    return out


_COMPILED: dict = {}
_COMPILE_ERROR: list = []


def fused(name: str, fn, *tensors: torch.Tensor, varying: int = 1):
    """fn(*tensors), through torch.compile when FIRESAFE_COMPILE allows it and no gradient flows through it.

    The first `varying` dimensions of each tensor that has more are the ones that change between calls (tokens,
    batch, sequence): only they are marked symbolic, and dynamic=False keeps every other size static (automatic
    dynamic shapes would make the RMSNorm's hidden size symbolic once the LLM's differs from the tower's). With
    dynamic=True every size is symbolic, head and hidden sizes included, and the vision rotary's kernel takes
    2.1x as long (bench/README.md, run U). A new hidden size is one more static graph (a handful per process).
    Inside a graph that is being compiled already (SCORE_COMPILE_LLM's layers) fn is traced into that graph."""
    first = tensors[0]
    wanted = COMPILE == "on" or (COMPILE == "auto" and first.is_cuda)
    if (not wanted or _COMPILE_ERROR or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors if isinstance(t, torch.Tensor)))):
        return fn(*tensors)
    try:
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(fn, dynamic=COMPILE_DIMS == "all")
        if COMPILE_DIMS == "tokens":
            for t in tensors:
                for d in range(varying if t.dim() > varying else 0):
                    torch._dynamo.maybe_mark_dynamic(t, d)
        return _COMPILED[name](*tensors)
    except Exception as e:  # no compiler, an inductor bug, ...: eager from now on
        _COMPILE_ERROR.append(f"{name}: {type(e).__name__}: {e}")
        import warnings

        warnings.warn(f"vision_attention: torch.compile failed, running eager ({_COMPILE_ERROR[-1][:300]})")
        return fn(*tensors)


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' own class


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm.forward's arithmetic, as a function of tensors."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in for Qwen2_5_VLRMSNorm.forward: compiled where no gradient flows (see FIRESAFE_COMPILE)."""
    if COMPILE == "off" or not (COMPILE == "on" or hidden_states.is_cuda):
        return ORIGINAL_NORM_FORWARD(self, hidden_states)
    if torch.compiler.is_compiling():  # traced into a compiled decoder layer: eps is a constant of that graph.
        # Caching the tensor on the module here would be a side effect the layer's guards check: one more
        # compile of every layer on the second batch (run X's cold +3-4 s per stage, bench/README.md).
        return _rms_norm(hidden_states, self.weight, self.variance_epsilon)
    eps = getattr(self, "_firesafe_eps", None)
    if eps is None or eps.device != hidden_states.device:
        eps = self._firesafe_eps = torch.tensor(self.variance_epsilon, dtype=torch.float32,
                                                device=hidden_states.device)
    return fused("rms_norm", _rms_norm, hidden_states, self.weight, eps, varying=hidden_states.dim() - 1)


def _use_varlen(q: torch.Tensor) -> bool:
    """varlen on CUDA in half precision; the batched sdpa path (as fast, autograd everywhere) when the tower
    is trained, since only the frozen, no-grad use of varlen_attn was measured."""
    if MODE == "sdpa" or varlen_attn is None or not q.is_cuda or (torch.is_grad_enabled() and q.requires_grad):
        return False
    return q.dtype in (torch.float16, torch.bfloat16)


def attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                      max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """Drop-in for Qwen2_5_VLVisionAttention.forward: same projections and rotary, no per-window loop."""
    if (MODE == "off" or self.config._attn_implementation != "sdpa" or kwargs.get("output_attentions")
            or (self.training and self.attention_dropout > 0)):
        return ORIGINAL_ATTENTION_FORWARD(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                          max_seqlen=max_seqlen, **kwargs)
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = fused("rotary", ORIGINAL_ROTARY, q, k, cos, sin)
    if _use_varlen(q):
        lengths, longest = _segments(cu_seqlens)
        if LONG_ATTN == "cudnn" and longest >= LONG_SEGMENT and lengths.count(longest) == len(lengths):
            return self.proj(_long_sdpa(q, k, v, longest, self.scaling).reshape(seq_length, -1))
        cu = cu_seqlens.to(torch.int32)
        max_seqlen = longest if max_seqlen is None else max_seqlen
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen,
                          **_VARLEN_SCALE(self.scaling, q.shape[-1]))
    else:
        out = _grouped_sdpa(q, k, v, cu_seqlens, self.scaling)
    return self.proj(out.reshape(seq_length, -1).contiguous())


def _long_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    """_equal_sdpa preferring cuDNN's kernel: 1.7x varlen_attn's speed on a full-attention layer of 5,120 patches
    per image on an H200, equal on 64-patch windows (bench/README.md, run U)."""
    with sdpa_kernel(_LONG_BACKENDS, set_priority=True):  # the others are the fallbacks, in this order
        return _equal_sdpa(q, k, v, length, scaling)


def _varlen_scale_kwargs():
    import inspect

    if varlen_attn is None:
        return lambda scaling, dim: {}
    takes_scale = "scale" in inspect.signature(varlen_attn).parameters

    def kwargs(scaling: float, dim: int) -> dict:
        if takes_scale:
            return {"scale": scaling}
        if abs(scaling - dim ** -0.5) > 1e-12:  # older signature: only the default 1/sqrt(dim) scale
            raise RuntimeError("this torch's varlen_attn has no scale argument; set FIRESAFE_VISION_ATTN=sdpa")
        return {}
    return kwargs


_VARLEN_SCALE = _varlen_scale_kwargs()


def patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in for Qwen2_5_VisionPatchEmbed.forward: Conv3d with kernel == stride on one patch is a matmul.
    Under ZeRO-3 transformers' forward (it calls `proj`, so DeepSpeed gathers its weight)."""
    weight = self.proj.weight
    if any_zero3(self.proj.parameters()):
        return ORIGINAL_PATCH_EMBED_FORWARD(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, weight[0].numel()).to(dtype=weight.dtype)
    return F.linear(hidden_states, weight.reshape(weight.shape[0], -1), self.proj.bias).view(-1, self.embed_dim)


def _padded(param: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A zero-padded copy of `param` with `size` along `dim`."""
    shape = list(param.shape)
    shape[dim] = size
    out = param.new_zeros(shape)
    out.narrow(dim, 0, param.shape[dim]).copy_(param)
    return out


def _mlp_padding(self) -> tuple:
    """(gate weight, gate bias, up weight, up bias, down weight), zero-padded to an aligned width; rebuilt only
    when a weight changes. gate/up parameters become views of their padded storage (same shape and values)."""
    inter = self.gate_proj.weight.shape[0]
    width = -(-inter // MLP_ALIGN) * MLP_ALIGN
    weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
    key = tuple((w.data_ptr(), w._version) for w in weights)
    cached = getattr(self, "_firesafe_mlp", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    padded = []
    for lin in (self.gate_proj, self.up_proj):
        full = _padded(lin.weight.data, 0, width)
        lin.weight.data = full[:inter]
        padded += [full, None if lin.bias is None else _padded(lin.bias.data, 0, width)]
    padded.append(_padded(self.down_proj.weight.data, 1, width))
    key = tuple((w.data_ptr(), w._version) for w in weights)
    self._firesafe_mlp = (key, tuple(padded))
    return self._firesafe_mlp[1]


def vision_mlp_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    """Drop-in for Qwen2_5_VLMLP.forward (the vision tower's MLP) with an aligned intermediate width.
    Under ZeRO-3 transformers' forward (the padding reads and re-stores weights outside their modules' forward)."""
    if VISION_MLP == "off" or any_zero3(self.parameters()):
        return ORIGINAL_MLP_FORWARD(self, hidden_state)
    inter = self.gate_proj.weight.shape[0]
    use = VISION_MLP == "pad" or (VISION_MLP == "auto" and hidden_state.is_cuda and inter % 8 != 0)
    needs_grad = torch.is_grad_enabled() and (hidden_state.requires_grad or any(
        p.requires_grad for p in (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)))
    if not use or needs_grad or inter % MLP_ALIGN == 0:
        return ORIGINAL_MLP_FORWARD(self, hidden_state)
    gate_w, gate_b, up_w, up_b, down_w = _mlp_padding(self)
    gate, up = F.linear(hidden_state, gate_w, gate_b), F.linear(hidden_state, up_w, up_b)
    act = fused("silu_mul", _silu_mul, gate, up) if _is_silu(self.act_fn) else self.act_fn(gate) * up
    return F.linear(act, down_w, self.down_proj.bias)


def _lora_cast_patch():
    """PEFT's BaseTunerLayer._cast_input_dtype, skipping the half -> fp32 copy under autocast."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a swift dependency
        return None, None
    original = original_of(BaseTunerLayer._cast_input_dtype)

    def cast_input_dtype(self, x, dtype):
        if (x is not None and dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)
                and torch.is_autocast_enabled(x.device.type)):
            return x  # autocast runs the adapter's matmuls in the half type anyway
        return original(self, x, dtype)

    cast_input_dtype.__wrapped_original__ = original
    return BaseTunerLayer, cast_input_dtype


def apply(mode: str | None = None, patch_embed: str | None = None, vision_mlp: str | None = None,
          lora_cast: str | None = None, compile: str | None = None, compile_dims: str | None = None,
          long_attn: str | None = None) -> None:
    """Install the patches (idempotent); arguments override the environment's choice."""
    global MODE, PATCH_EMBED, VISION_MLP, LORA_CAST, COMPILE, COMPILE_DIMS, LONG_ATTN
    MODE = knob("FIRESAFE_VISION_ATTN", mode or MODE)
    PATCH_EMBED = knob("FIRESAFE_PATCH_EMBED", patch_embed or PATCH_EMBED)
    VISION_MLP = knob("FIRESAFE_VISION_MLP", vision_mlp or VISION_MLP)
    LORA_CAST = knob("FIRESAFE_LORA_CAST", lora_cast or LORA_CAST)
    COMPILE = knob("FIRESAFE_COMPILE", compile or COMPILE)
    dims = knob("FIRESAFE_COMPILE_DIMS", compile_dims or COMPILE_DIMS)
    if dims != COMPILE_DIMS:
        _COMPILED.clear()  # compiled for the other choice of symbolic sizes
    COMPILE_DIMS, LONG_ATTN = dims, knob("FIRESAFE_LONG_ATTN", long_attn or LONG_ATTN)
    norm_forward.__wrapped_original__ = ORIGINAL_NORM_FORWARD
    qwen.Qwen2_5_VLRMSNorm.forward = ORIGINAL_NORM_FORWARD if COMPILE == "off" else norm_forward
    attention_forward.__wrapped_original__ = ORIGINAL_ATTENTION_FORWARD
    patch_embed_forward.__wrapped_original__ = ORIGINAL_PATCH_EMBED_FORWARD
    vision_mlp_forward.__wrapped_original__ = ORIGINAL_MLP_FORWARD
    qwen.Qwen2_5_VLVisionAttention.forward = ORIGINAL_ATTENTION_FORWARD if MODE == "off" else attention_forward
    qwen.Qwen2_5_VisionPatchEmbed.forward = (patch_embed_forward if PATCH_EMBED == "linear"
                                             else ORIGINAL_PATCH_EMBED_FORWARD)
    qwen.Qwen2_5_VLMLP.forward = ORIGINAL_MLP_FORWARD if VISION_MLP == "off" else vision_mlp_forward
    layer, cast = _lora_cast_patch()
    if layer is not None:
        layer._cast_input_dtype = cast if LORA_CAST == "auto" else cast.__wrapped_original__


def restore() -> None:
    """Back to transformers' and PEFT's own code (for tests and benchmarks)."""
    qwen.Qwen2_5_VLVisionAttention.forward = ORIGINAL_ATTENTION_FORWARD
    qwen.Qwen2_5_VisionPatchEmbed.forward = ORIGINAL_PATCH_EMBED_FORWARD
    qwen.Qwen2_5_VLMLP.forward = ORIGINAL_MLP_FORWARD
    qwen.Qwen2_5_VLRMSNorm.forward = ORIGINAL_NORM_FORWARD
    layer, cast = _lora_cast_patch()
    if layer is not None:
        layer._cast_input_dtype = cast.__wrapped_original__


apply()
