"""swift_plugins/vision_attention.py against transformers' own Qwen2.5-VL vision forward, on a tiny fp32 model."""
from __future__ import annotations

import pytest
import torch

va = pytest.importorskip("swift_plugins.vision_attention")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402


@pytest.fixture(scope="module")
def model():
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1, 3]),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
    )
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = Qwen2_5_VLForConditionalGeneration(config).eval()
    yield m
    va.apply()


def vision(model, grids, mode, patch_embed):
    """Vision tower output for images of the given (h, w) patch grids."""
    va.restore() if mode == "original" else va.apply(mode, patch_embed)
    try:
        grid_thw = torch.tensor([[1, h, w] for h, w in grids])
        torch.manual_seed(1)
        pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14)
        with torch.no_grad():
            return model.model.visual(pixels, grid_thw=grid_thw).pooler_output
    finally:
        va.apply("auto", "linear")


# 12x12 patches: windows of 64, 32, 32 and 16 patches (several lengths, the gather path);
# 16x16: four equal windows (the reshape path); mixed sizes in one batch.
GRIDS = [[(12, 12)], [(16, 16)], [(16, 16), (12, 20), (8, 8)]]


@pytest.mark.parametrize("grids", GRIDS)
def test_attention_identical_to_transformers_loop(model, grids, monkeypatch):
    expected = vision(model, grids, "original", "conv")
    calls = []
    grouped = va._grouped_sdpa
    monkeypatch.setattr(va, "_grouped_sdpa", lambda *a, **k: calls.append(1) or grouped(*a, **k))
    got = vision(model, grids, "sdpa", "conv")
    assert len(calls) == 4  # every vision layer took the batched path
    assert got.shape == expected.shape
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("grids", GRIDS)
def test_patch_embed_as_matmul(model, grids):
    expected = vision(model, grids, "original", "conv")
    got = vision(model, grids, "sdpa", "linear")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_uses_batched_sdpa(model):
    grids = [(12, 12), (16, 16)]
    assert torch.equal(vision(model, grids, "auto", "conv"), vision(model, grids, "sdpa", "conv"))


def test_off_is_transformers(model):
    grids = [(12, 12)]
    assert torch.equal(vision(model, grids, "off", "conv"), vision(model, grids, "original", "conv"))


def test_bad_knob():
    with pytest.raises(ValueError):
        va.apply("fast")
