"""The High-Risk Feature Amplifier: trainable modules hooked into a Qwen2.5-VL model, beside its LoRA.

(a) Visual gate, on the visual tokens the vision tower hands to the LLM (its merger's output):
        out = x · (1 + c) · (1 + s · tanh(v · x/rms(x) + b))
    c: per-channel gain (which feature channels carry hazard cues), s, v, b: a content-dependent per-token gain
    (which image patches look like hazards). c = 0 and s = 0 at initialisation, so out = x exactly.
(b) Attention reweighting, in chosen LLM decoder layers: a learned per-head bias β[h] added to the attention
    logits of every query towards image-token keys (softmax(q·k/√d + β[h]·[k is an image token])): β > 0 makes
    the head look at the image more. β = 0 at initialisation, so the attention is unchanged.

Everything is applied with PyTorch hooks on the model's own modules (no copied transformers code): a forward
hook on the vision tower `visual` (outside swift's no-grad wrapper for a frozen tower, so the gate trains; a hook
on `visual.merger` itself would run inside it), a pre-hook on the input embedding (it sees the token ids, so it
records where the image tokens are) and pre-hooks on the chosen layers' `self_attn` (they apply β, one of the two
ways below). Weights live in one module, `HighRiskAmplifier`, attached to the HF model as `hr_amplifier`;
it is saved beside the adapter as amplifier.safetensors + amplifier_config.json.

Two ways to add β, the same logits (FIRESAFE_AMP_ATTN): "fused" (the default with `--attn_impl sdpa`) appends one
more dimension to each head, q' = [q, β[h]], k' = [k, [key is an image token] / scale] (zero-padded to a multiple of
8), so q'·k'·scale = q·k·scale + β[h]·[image key] and SDPA keeps its fused flash/cuDNN kernel with `is_causal`; "mask"
(and every `eager` run) builds the biased [B, H, Q, K] additive mask, which sends SDPA to its slower masked kernel
and computes a gradient for the whole mask. The fused path is a patch: attach() wraps transformers' "sdpa" attention
function through its registry (AttentionInterface.register), and the wrapper acts only on the calls whose layer hook
hands it this amplifier's bias (the `amp_key_bias` keyword, which the attention module passes through to its
attention function); every other call runs transformers' sdpa unchanged. flash-attention is refused (no bias at all).

DeepSpeed layout. Every parameter is read only inside the forward of the module that owns it, and once per
forward pass: the gate's in `VisualGate.forward` (called from the vision tower's hook), and each biased layer's β
in its own `AttentionBias` module (one parameter per layer, `attn_bias.<layer>.bias`), whose forward adds it to the
mask and is called from that layer's pre-hook. So ZeRO-3 gathers them with its module hooks, and with reentrant
gradient checkpointing (every decoder layer's backward run on its own) each parameter still gets one gradient
per backward, which ZeRO-2 requires ("gradient computed twice"). Checkpoints of the earlier layout, one
`attn_bias` tensor [layers, heads], still load (mapped row by row onto the per-layer parameters).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from swift.utils import get_logger
from torch import nn

from swift_plugins._zero import gathered

logger = get_logger()

ATTR = "hr_amplifier"  # attribute of the HF model that holds the amplifier
WEIGHTS_FILE = "amplifier.safetensors"
CONFIG_FILE = "amplifier_config.json"
ENV_LAYERS = "FIRESAFE_AMP_LAYERS"
ENV_ATTN = "FIRESAFE_AMP_ATTN"  # fused (default) | mask: how β reaches the attention logits (module docstring)
KEY_PAD = 8  # extra head dimensions of the fused path: one carries the bias, the rest keep the size a multiple of 8


def attn_path_from_env() -> str:
    value = (os.environ.get(ENV_ATTN) or "fused").strip().lower()
    if value not in ("fused", "mask"):
        raise ValueError(f"{ENV_ATTN}={value!r}: expected fused or mask")
    return value


def resolve_layers(spec: str | None, n_layers: int) -> list[int]:
    """Decoder layers that get the attention bias.

    "auto" (default): up to 4 layers spread evenly from the first to the last. "all", "none", or a list of
    indices ("0,8,16"; negative counts from the end).
    """
    spec = (spec or "auto").strip().lower()
    if spec == "none":
        return []
    if spec == "all":
        return list(range(n_layers))
    if spec == "auto":
        k = min(4, n_layers)
        return sorted({round(i * (n_layers - 1) / max(1, k - 1)) for i in range(k)})
    layers = set()
    for item in spec.replace(";", ",").split(","):
        if item.strip():
            index = int(item)
            if not -n_layers <= index < n_layers:
                raise ValueError(f"{ENV_LAYERS}: layer {index} out of range for {n_layers} decoder layers")
            layers.add(index % n_layers)
    return sorted(layers)


@dataclass
class AmplifierConfig:
    hidden_size: int      # width of the visual tokens = the LLM's hidden size
    num_heads: int        # attention heads per LLM layer
    layers: list[int]     # decoder layers with an attention bias
    visual_token_ids: list[int]  # <|image_pad|>, <|video_pad|>: the keys the bias applies to

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "AmplifierConfig":
        return cls(**json.loads(Path(directory, CONFIG_FILE).read_text(encoding="utf-8")))


class VisualGate(nn.Module):
    """x · (1 + c) · (1 + s · tanh(v · x/rms(x) + b)); the identity at initialisation (c = 0, s = 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.channel = nn.Parameter(torch.zeros(dim))
        self.token_scale = nn.Parameter(torch.zeros(()))
        # The probe direction starts random (unit-variance scores) so that s gets a gradient from step one.
        self.probe = nn.Parameter(torch.randn(dim) / dim ** 0.5)
        self.probe_bias = nn.Parameter(torch.zeros(()))
        self.last_gain_dev = None  # mean |gain - 1| over the last batch's visual tokens, for the stats callback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # In float32 whatever the parameters' dtype: DeepSpeed's bf16 mode casts every parameter to bf16.
        probe, probe_bias, token_scale, channel = (p.to(device=xf.device, dtype=xf.dtype) for p in (
            self.probe, self.probe_bias, self.token_scale, self.channel))
        unit = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        saliency = torch.tanh(unit @ probe + probe_bias)
        token_gain = 1 + token_scale * saliency
        gain = token_gain.unsqueeze(-1) * (1 + channel)
        self.last_gain_dev = (gain.detach() - 1).abs().mean()
        return (xf * gain).to(x.dtype)


class AttentionBias(nn.Module):
    """β[h] of one decoder layer, added to the attention logits of image-token keys; β = 0 at start.

    The parameter is named `bias` so that HF's decay rule (no weight decay for `*bias*`) leaves it undecayed, and
    it is read only here, so ZeRO-3's hooks on this module gather it (see the module docstring)."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, keys: torch.Tensor, mask: torch.Tensor | None = None,
                qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, scaling: float | None = None):
        """keys [B, K] bool (True at image tokens), and one of:
        mask [B, 1 or H, Q, K] additive -> mask + β[h]·keys, [B, H, Q, K] (the "mask" path);
        qkv (query [B, H, Q, D], key and value [B, Hkv, K, D]) and the attention's scaling -> the same three with
        KEY_PAD more dimensions, so that SDPA at that scaling adds β[h]·keys to the logits (the "fused" path)."""
        if qkv is None:
            beta = self.bias.to(device=mask.device, dtype=mask.dtype)
            return mask + beta[None, :, None, None] * keys[:, None, None, :].to(mask.dtype)
        query, key, value = qkv
        (batch, heads, n_queries, _), n_kv = query.shape, key.shape[1]
        beta = self.bias.to(device=query.device, dtype=query.dtype)[None, :, None, None]
        q_extra = torch.cat([beta.expand(batch, heads, n_queries, 1),
                             query.new_zeros(batch, heads, n_queries, KEY_PAD - 1)], -1)
        k_col = (keys.to(key.dtype) / scaling)[:, None, :, None].expand(batch, n_kv, keys.shape[1], 1)
        k_extra = torch.cat([k_col, key.new_zeros(batch, n_kv, keys.shape[1], KEY_PAD - 1)], -1)
        return (torch.cat([query, q_extra], -1), torch.cat([key, k_extra], -1), F.pad(value, (0, KEY_PAD)))


def _sdpa_with_key_bias(sdpa, module, query, key, value, attention_mask, *args, amp_key_bias=None, **kwargs):
    """transformers' sdpa attention function (`sdpa`), with the amplifier's β when a layer hook passes
    amp_key_bias = (AttentionBias, keys [B, K]): q/k/v get the extra dimensions, the output loses them again."""
    if amp_key_bias is None:
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    bias, keys = amp_key_bias
    if keys.shape[1] != key.shape[2]:
        raise RuntimeError(f"hr_amplifier: {keys.shape[1]} key flags for {key.shape[2]} attention keys")
    head_dim = query.shape[-1]
    # SDPA's default scale would follow the padded head size: pass the layer's own
    kwargs["scaling"] = kwargs.get("scaling") or head_dim ** -0.5
    query, key, value = bias(keys, qkv=(query, key, value), scaling=kwargs["scaling"])
    out, weights = sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    return out[..., :head_dim], weights


def install_fused_attention() -> bool:
    """Patch: wrap transformers' registered "sdpa" attention function with _sdpa_with_key_bias (once per process).
    False where transformers has no AttentionInterface (the mask path is used then)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError:
        return False
    current = ALL_ATTENTION_FUNCTIONS.get("sdpa")
    if current is None:
        return False
    if not getattr(current, "firesafe_key_bias", False):
        wrapper = functools.partial(_sdpa_with_key_bias, current)
        wrapper.firesafe_key_bias = True
        AttentionInterface.register("sdpa", wrapper)
        if "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping:  # an instance override would hide the registry's
            ALL_ATTENTION_FUNCTIONS["sdpa"] = wrapper
    return True


def fused_attention_installed() -> bool:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    return bool(getattr(ALL_ATTENTION_FUNCTIONS.get("sdpa"), "firesafe_key_bias", False))


def _map_legacy_attn_bias(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: the earlier layout's `attn_bias` [layers, heads] -> `attn_bias.<layer>.bias`."""
    key = prefix + "attn_bias"
    old = state_dict.get(key)
    layers = module.config.layers
    if isinstance(old, torch.Tensor) and tuple(old.shape) == (len(layers), module.config.num_heads):
        del state_dict[key]
        for slot, layer in enumerate(layers):
            state_dict[f"{prefix}attn_bias.{layer}.bias"] = old[slot].clone()


class HighRiskAmplifier(nn.Module):

    def __init__(self, config: AmplifierConfig):
        super().__init__()
        self.config = config
        self.gate = VisualGate(config.hidden_size)
        # One module (one parameter) per biased layer, keyed by the layer's index.
        self.attn_bias = nn.ModuleDict({str(layer): AttentionBias(config.num_heads) for layer in config.layers})
        self.register_load_state_dict_pre_hook(_map_legacy_attn_bias)
        self.enabled = True  # False: every hook passes through (plain LoRA), for comparisons
        self.attn_path = attn_path_from_env()  # "fused" or "mask": how β reaches the logits (module docstring)
        self._visual_keys: torch.Tensor | None = None  # [B, S] True where the key is an image/video token
        self._handles: list = []

    # ------------------------------------------------------------------ hooks
    def attach(self, hf_model: nn.Module) -> "HighRiskAmplifier":
        visual, embed, layers = model_parts(hf_model)
        if self._handles:
            raise RuntimeError("amplifier already attached")
        self.to(next(visual.merger.parameters()).device)
        if self.attn_path == "fused" and self.config.layers:
            install_fused_attention()
        self._handles.append(visual.register_forward_hook(self._gate_hook))
        self._handles.append(embed.register_forward_pre_hook(self._ids_hook))
        for index in self.config.layers:
            hook = _AttentionHook(self, index)
            self._handles.append(layers[index].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        setattr(hf_model, ATTR, self)  # a submodule: its parameters train, move and count with the model
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _gate_hook(self, module, args, output):
        if not self.enabled:
            return None
        if isinstance(output, torch.Tensor):  # older transformers: the merged tokens themselves
            return self.gate(output)
        if getattr(output, "pooler_output", None) is None:
            raise TypeError(f"vision tower returned {type(output).__name__} without pooler_output (merged tokens)")
        output.pooler_output = self.gate(output.pooler_output)
        return output

    def _ids_hook(self, module, args):
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None  # e.g. transformers embedding a single placeholder id to find image positions
        keys = self._visual_keys
        if ids.shape[1] == 1 and keys is not None and keys.shape[0] == ids.shape[0]:
            return None  # a decoding step: one more text key per row; the attention hook pads the prompt's mask
        # Compared with each id as a Python number: a CUDA tensor built from the id list would be a blocking
        # host-to-device copy, i.e. a full synchronisation at the start of every forward pass.
        keys = torch.zeros_like(ids, dtype=torch.bool)
        for token in self.config.visual_token_ids:
            keys |= ids == token
        self._visual_keys = keys
        return None

    def visual_keys(self, batch: int, n_keys: int, device) -> torch.Tensor | None:
        """[B, K] image-key mask for K keys, or None when the recorded ids do not describe these keys.

        The mask comes from the last token ids that went through the input embedding: swift (training, infer)
        and transformers (generate) always embed the ids first. A caller that feeds its own inputs_embeds
        without calling the embedding would get the previous batch's positions.
        """
        keys = self._visual_keys
        if keys is None or keys.shape[0] != batch or keys.shape[1] > n_keys:
            return None
        if keys.shape[1] < n_keys:  # generation: keys added after the prompt are generated text
            keys = F.pad(keys, (0, n_keys - keys.shape[1]), value=False)
        return keys.to(device)

    def betas(self) -> torch.Tensor:
        """[biased layers, heads]: β of every biased layer (config.layers order); for stats and tests."""
        return torch.stack([module.bias for module in self.attn_bias.values()])

    # ------------------------------------------------------------------ stats and files
    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Numbers for the training logs (swift_plugins/callback.py): how far the amplifier is from the identity.

        Under ZeRO-3 the parameters are read through deepspeed.zero.GatheredParameters (a collective: call this on
        every rank, as a training callback does); if they are partitioned and deepspeed cannot be imported, only the
        gate's gain deviation (computed in the last forward pass) is reported."""
        out = {}
        if self.gate.last_gain_dev is not None:
            out["gate_gain_abs_dev"] = float(self.gate.last_gain_dev)
        with gathered(self.parameters()) as available:
            if not available:
                if not getattr(self, "_warned_partitioned", False):
                    logger.warning("hr_amplifier: parameters are ZeRO-3 partitions and deepspeed is not importable; "
                                   "logging only amp/gate_gain_abs_dev")
                    self._warned_partitioned = True
                return out
            out["gate_channel_abs_mean"] = self.gate.channel.abs().mean().item()
            out["gate_token_scale"] = self.gate.token_scale.item()
            if self.config.layers:
                betas = self.betas().float()
                out["attn_bias_absmax"] = betas.abs().max().item()
                for slot, layer in enumerate(self.config.layers):
                    out[f"attn_bias_L{layer}_mean"] = betas[slot].mean().item()
                    out[f"attn_bias_L{layer}_absmax"] = betas[slot].abs().max().item()
        return out

    def save(self, directory: str | Path, state_dict: dict | None = None) -> None:
        """amplifier.safetensors + amplifier_config.json. `state_dict`: the full model's (DeepSpeed hands over the
        gathered weights): its `hr_amplifier.*` entries win over the module's own tensors, which are empty
        partitions under ZeRO-3. Runs on the main process only, so it cannot gather them itself: without full
        weights it writes the config and logs an error instead of writing empty tensors."""
        import safetensors.torch

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if state_dict:
            for key in tensors:
                for full, value in state_dict.items():
                    if full.endswith(f"{ATTR}.{key}"):
                        tensors[key] = value.detach().cpu().contiguous()
        expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.named_parameters()}
        partial = [k for k, v in tensors.items() if k in expected and tuple(v.shape) != expected[k]]
        self.config.save(directory)
        if partial:
            logger.error(f"hr_amplifier: not writing {WEIGHTS_FILE}: {partial} are ZeRO-3 partitions and no gathered "
                         "weights were handed over (set stage3_gather_16bit_weights_on_model_save true, as swift's "
                         "zero3 configs do, or recover them from the DeepSpeed checkpoint with zero_to_fp32)")
            return
        safetensors.torch.save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})

    def load(self, directory: str | Path) -> None:
        """Weights from amplifier.safetensors, either layout (per-layer `attn_bias.<layer>.bias`, or the earlier
        single `attn_bias` [layers, heads])."""
        import safetensors.torch

        state = safetensors.torch.load_file(os.path.join(directory, WEIGHTS_FILE))
        device = next(self.parameters()).device
        self.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)


class _AttentionHook:
    """Pre-hook of one decoder layer's self_attn: hands that layer's AttentionBias and the image-key flags to the
    wrapped sdpa (fused path), or adds β[h] to the attention mask at image-token keys (mask path); either way β is
    read inside its owner's forward, so DeepSpeed sees it used there."""

    def __init__(self, amplifier: HighRiskAmplifier, layer: int):
        self.amplifier, self.layer = amplifier, layer

    def __call__(self, module, args, kwargs):
        amp = self.amplifier
        if not amp.enabled:
            return None
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(
                f"the High-Risk Feature Amplifier adds a bias to the attention logits and needs an additive mask: "
                f"use --attn_impl sdpa (the default) or eager, not {impl}")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        batch, n_queries = hidden.shape[:2]
        if mask is None:  # sdpa without padding: causal, which we now have to spell out
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
            n_keys = past + n_queries
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            n_keys = mask.shape[-1]
        else:
            raise NotImplementedError(f"the High-Risk Feature Amplifier needs a 4-D attention mask, got "
                                      f"{type(mask).__name__} (packing and padding_free are not supported)")
        keys = amp.visual_keys(batch, n_keys, hidden.device)
        if keys is None:
            return None
        if impl == "sdpa" and amp.attn_path == "fused" and fused_attention_installed():
            kwargs["amp_key_bias"] = (amp.attn_bias[str(self.layer)], keys)  # to the attention function, mask as is
            return args, kwargs
        dtype = hidden.dtype
        lowest = torch.finfo(dtype).min
        if mask is None:
            q = torch.arange(n_queries, device=hidden.device) + (n_keys - n_queries)
            allowed = torch.arange(n_keys, device=hidden.device)[None, :] <= q[:, None]
            base = torch.zeros(allowed.shape, dtype=dtype, device=hidden.device).masked_fill(~allowed, lowest)
            base = base[None, None]
        elif mask.dtype == torch.bool:
            base = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, lowest)
        else:
            base = mask.to(dtype)
        kwargs["attention_mask"] = amp.attn_bias[str(self.layer)](keys, mask=base)
        return args, kwargs


def model_parts(hf_model: nn.Module):
    """(vision tower, input embedding, decoder layers) of a Qwen2.5-VL-like model (transformers 5 layout)."""
    inner = getattr(hf_model, "model", hf_model)
    visual = getattr(inner, "visual", None) or getattr(hf_model, "visual", None)
    language = getattr(inner, "language_model", None) or inner
    merger = getattr(visual, "merger", None)
    layers = getattr(language, "layers", None)
    if merger is None or layers is None:
        raise TypeError(f"{type(hf_model).__name__}: expected a Qwen2.5-VL-like model with visual.merger and "
                        "language_model.layers")
    return visual, hf_model.get_input_embeddings(), layers


def hf_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def new_config(hf_model: nn.Module, layers_spec: str | None = None) -> AmplifierConfig:
    config = hf_model.config
    text = getattr(config, "text_config", None) or config
    _, _, layers = model_parts(hf_model)
    spec = layers_spec if layers_spec is not None else os.environ.get(ENV_LAYERS)
    ids = [getattr(config, name) for name in ("image_token_id", "video_token_id") if getattr(config, name, None)]
    return AmplifierConfig(hidden_size=text.hidden_size, num_heads=text.num_attention_heads,
                           layers=resolve_layers(spec, len(layers)), visual_token_ids=ids)


def attach_new(model: nn.Module, layers_spec: str | None = None) -> HighRiskAmplifier:
    hf = hf_model_of(model)
    return HighRiskAmplifier(new_config(hf, layers_spec)).attach(hf)


def attach_saved(model: nn.Module, directory: str | Path, trainable: bool) -> HighRiskAmplifier:
    hf = hf_model_of(model)
    amp = HighRiskAmplifier(AmplifierConfig.load(directory)).attach(hf)
    amp.load(directory)
    amp.requires_grad_(trainable)
    return amp


def find_amplifier(model: nn.Module) -> HighRiskAmplifier | None:
    for module in model.modules():
        if isinstance(module, HighRiskAmplifier):
            return module
    return None
