"""swift_plugins/patches/checkpoint_layers.py: FIRESAFE_CKPT_SKIP_LAYERS=N leaves the last N language-model layers
without recompute, the vision tower and the results untouched."""
from __future__ import annotations

import importlib

import pytest
import torch

cl = pytest.importorskip("swift_plugins.patches.checkpoint_layers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402


def tiny(layers: int = 4):
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


def flags(model):
    return ([layer.gradient_checkpointing for layer in model.model.language_model.layers],
            [block.gradient_checkpointing for block in model.model.visual.blocks])


def grads(model, n_skip, monkeypatch):
    monkeypatch.setenv(cl.ENV, str(n_skip))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 240, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_last_layers_keep_their_activations(monkeypatch):
    model = tiny()
    monkeypatch.setenv(cl.ENV, "1")
    model.gradient_checkpointing_enable()
    assert flags(model) == ([True, True, True, False], [True, True])
    monkeypatch.setenv(cl.ENV, "10")  # more than there are: none recomputed
    model.gradient_checkpointing_enable()
    assert flags(model)[0] == [False] * 4
    monkeypatch.setenv(cl.ENV, "0")
    model.gradient_checkpointing_enable()
    assert flags(model) == ([True] * 4, [True, True])
    assert cl.decoder_layers(model) is model.model.language_model.layers


def test_same_gradients_as_full_checkpointing(monkeypatch):
    model = tiny()
    full = grads(model, 0, monkeypatch)
    calls = []
    for layer in model.model.language_model.layers:  # count the layers run under checkpoint
        layer.register_forward_pre_hook(lambda m, a: calls.append(m.gradient_checkpointing))
    part = grads(model, 2, monkeypatch)
    assert calls == [True, True, False, False, True, True]  # 4 forwards, the 2 checkpointed ones recomputed
    assert set(part) == set(full)
    for n in full:
        torch.testing.assert_close(part[n], full[n])


def test_bad_knob(monkeypatch):
    monkeypatch.setenv(cl.ENV, "-1")
    with pytest.raises(ValueError, match=cl.ENV):
        importlib.reload(cl)
    monkeypatch.setenv(cl.ENV, "0")
    importlib.reload(cl)
