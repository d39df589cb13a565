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
records where the image tokens are) and pre-hooks on the chosen layers' `self_attn` (they add β to the attention
mask they receive). The bias needs an additive mask, so the LLM must run with `--attn_impl sdpa` (transformers'
default) or `eager`; flash-attention is refused. Weights live in one module, `HighRiskAmplifier`, attached to the
HF model as `hr_amplifier`; it is saved beside the adapter as amplifier.safetensors + amplifier_config.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ATTR = "hr_amplifier"  # attribute of the HF model that holds the amplifier
WEIGHTS_FILE = "amplifier.safetensors"
CONFIG_FILE = "amplifier_config.json"
ENV_LAYERS = "FIRESAFE_AMP_LAYERS"


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
        unit = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        saliency = torch.tanh(unit @ self.probe.to(xf.device) + self.probe_bias.to(xf.device))
        token_gain = 1 + self.token_scale.to(xf.device) * saliency
        gain = token_gain.unsqueeze(-1) * (1 + self.channel.to(xf.device))
        self.last_gain_dev = (gain.detach() - 1).abs().mean()
        return (xf * gain).to(x.dtype)


class HighRiskAmplifier(nn.Module):

    def __init__(self, config: AmplifierConfig):
        super().__init__()
        self.config = config
        self.gate = VisualGate(config.hidden_size)
        self.attn_bias = nn.Parameter(torch.zeros(len(config.layers), config.num_heads))
        self.enabled = True  # False: every hook passes through (plain LoRA), for comparisons
        self._visual_keys: torch.Tensor | None = None  # [B, S] True where the key is an image/video token
        self._handles: list = []

    # ------------------------------------------------------------------ hooks
    def attach(self, hf_model: nn.Module) -> "HighRiskAmplifier":
        visual, embed, layers = model_parts(hf_model)
        if self._handles:
            raise RuntimeError("amplifier already attached")
        self.to(next(visual.merger.parameters()).device)
        self._handles.append(visual.register_forward_hook(self._gate_hook))
        self._handles.append(embed.register_forward_pre_hook(self._ids_hook))
        for slot, index in enumerate(self.config.layers):
            hook = _AttentionHook(self, slot)
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
        self._visual_keys = torch.isin(ids, torch.tensor(self.config.visual_token_ids, device=ids.device))
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

    # ------------------------------------------------------------------ stats and files
    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Numbers for the training logs (swift_plugins/callback.py)."""
        out = {"gate_channel_abs_mean": self.gate.channel.abs().mean().item(),
               "gate_token_scale": self.gate.token_scale.item()}
        if self.gate.last_gain_dev is not None:
            out["gate_gain_abs_dev"] = float(self.gate.last_gain_dev)
        for slot, layer in enumerate(self.config.layers):
            out[f"attn_bias_L{layer}_mean"] = self.attn_bias[slot].mean().item()
            out[f"attn_bias_L{layer}_absmax"] = self.attn_bias[slot].abs().max().item()
        return out

    def save(self, directory: str | Path, state_dict: dict | None = None) -> None:
        import safetensors.torch

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if state_dict:  # DeepSpeed hands over gathered weights: prefer them to the (partitioned) module's
            for key in tensors:
                for full, value in state_dict.items():
                    if full.endswith(f"{ATTR}.{key}"):
                        tensors[key] = value.detach().cpu().contiguous()
        safetensors.torch.save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
        self.config.save(directory)

    def load(self, directory: str | Path) -> None:
        import safetensors.torch

        state = safetensors.torch.load_file(os.path.join(directory, WEIGHTS_FILE))
        self.load_state_dict({k: v.to(self.attn_bias.device) for k, v in state.items()}, strict=True)


class _AttentionHook:
    """Pre-hook of one decoder layer's self_attn: adds β[h] to the attention mask at image-token keys."""

    def __init__(self, amplifier: HighRiskAmplifier, slot: int):
        self.amplifier, self.slot = amplifier, slot

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
        beta = amp.attn_bias[self.slot].to(device=hidden.device, dtype=dtype)
        kwargs["attention_mask"] = base + beta[None, :, None, None] * keys[:, None, None, :].to(dtype)
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
