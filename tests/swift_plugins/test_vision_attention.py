"""swift_plugins/patches/vision_attention.py against transformers' own Qwen2.5-VL vision forward, on a tiny fp32 model."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

va = pytest.importorskip("swift_plugins.patches.vision_attention")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402


@pytest.fixture(scope="module")
def model():
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=100, num_heads=4, out_hidden_size=64,
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


def vision(model, grids, mode, patch_embed, vision_mlp="off"):
    """Vision tower output for images of the given (h, w) patch grids."""
    va.restore() if mode == "original" else va.apply(mode, patch_embed, vision_mlp)
    try:
        grid_thw = torch.tensor([[1, h, w] for h, w in grids])
        torch.manual_seed(1)
        pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14)
        with torch.no_grad():
            return model.model.visual(pixels, grid_thw=grid_thw).pooler_output
    finally:
        va.apply("auto", "linear", "auto")


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
    with pytest.raises(ValueError, match="FIRESAFE_VISION_ATTN"):
        va.apply("fast")
    with pytest.raises(ValueError, match="FIRESAFE_LONG_ATTN"):
        va.apply(long_attn="flash")


def test_vision_mlp_padded_to_aligned_width(model):
    """intermediate 100 -> 128 with zero lanes: same output, parameters keep their shape and values."""
    grids = [(12, 12), (16, 16)]
    before = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    expected = vision(model, grids, "sdpa", "linear", "off")
    got = vision(model, grids, "sdpa", "linear", "pad")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    mlp = model.model.visual.blocks[0].mlp
    assert mlp.gate_proj.weight.shape == (100, 64) and mlp.gate_proj.weight.is_contiguous()
    assert mlp._firesafe_mlp[1][0].shape == (128, 64) and mlp._firesafe_mlp[1][4].shape == (64, 128)
    after = model.model.visual.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(vision(model, grids, "sdpa", "linear", "pad"), got)  # cached padding reused


def test_vision_mlp_auto_is_off_on_cpu(model):
    grids = [(12, 12)]
    assert torch.equal(vision(model, grids, "sdpa", "linear", "auto"), vision(model, grids, "sdpa", "linear", "off"))


def test_lora_input_not_cast_under_autocast():
    """fp32 adapters on a bf16 layer: under autocast the skipped cast changes nothing."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float().normal_()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    calls = []
    layer = model.base_model.model[0]
    try:
        va.restore()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(x)
        va.apply(lora_cast="auto")
        layer.lora_A["default"].register_forward_pre_hook(lambda m, args: calls.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
        without_autocast = model(x)  # outside autocast PEFT still casts
    finally:
        va.apply("auto", "linear", "auto", "auto")
    assert calls[0] == torch.bfloat16 and calls[1] == torch.float32
    assert torch.equal(got, expected)
    assert without_autocast.dtype == torch.bfloat16


def test_compiled_paths_match_eager(model, monkeypatch):
    """FIRESAFE_COMPILE=on with torch.compile stubbed to the identity: the rewritten RMSNorm, rotary and
    SiLU*up calls give exactly transformers' results (the real compile runs on CUDA only, by default)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(va, "_COMPILED", {})
    grids = [(12, 12), (16, 16)]
    expected = vision(model, grids, "sdpa", "linear", "pad")
    try:
        va.apply(compile="on")
        got = vision(model, grids, "sdpa", "linear", "pad")
    finally:
        va.apply(compile="auto")
    assert set(va._COMPILED) == {"rotary", "rms_norm", "silu_mul"}
    assert torch.equal(got, expected)


def test_compile_failure_falls_back_to_eager(model, monkeypatch):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(va, "_COMPILED", {})
    monkeypatch.setattr(va, "_COMPILE_ERROR", [])
    grids = [(12, 12)]
    expected = vision(model, grids, "sdpa", "linear")
    try:
        va.apply(compile="on")
        with pytest.warns(UserWarning, match="torch.compile failed"):
            got = vision(model, grids, "sdpa", "linear")
    finally:
        va.apply(compile="auto")
    assert torch.equal(got, expected) and va._COMPILE_ERROR


def test_compiled_kernels_keep_feature_sizes_static(model, monkeypatch):
    """FIRESAFE_COMPILE_DIMS=tokens (default): compiled with dynamic=False, and only the token dimension of each
    activation (never a head, head-dim or hidden size, nor a weight) marked symbolic; =all: dynamic=True, no marks."""
    for dims, dynamic in (("tokens", False), ("all", True)):
        compiled, marked = [], []
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw["dynamic"]) or fn)
        monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda t, d: marked.append((tuple(t.shape), d)))
        monkeypatch.setattr(va, "_COMPILED", {})
        try:
            va.apply(compile="on", vision_mlp="pad", compile_dims=dims)
            vision_forward(model, [(16, 16), (12, 20)])
        finally:
            va.apply(compile="auto", vision_mlp="auto", compile_dims="tokens")
        assert compiled == [dynamic] * 3  # rotary, rms_norm, silu_mul
        if dims == "all":
            assert marked == []
            continue
        tokens = 16 * 16 + 12 * 20
        assert {d for _, d in marked} == {0} and {shape[0] for shape, _ in marked} == {tokens}
        assert {len(shape) for shape, _ in marked} == {2, 3}  # q and k [tokens, heads, dim]; cos, hidden [tokens, C]


def vision_forward(model, grids):
    """The tower's output with the patches as they are installed now (no apply/restore around it)."""
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    torch.manual_seed(1)
    with torch.no_grad():
        return model.model.visual(torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14),
                                  grid_thw=grid_thw).pooler_output


@pytest.mark.parametrize("grids, long_attn, long_calls", [
    ([(16, 16), (16, 16)], "cudnn", 2),   # equal images: the 2 full-attention layers batched, windows by varlen
    ([(16, 16), (12, 20)], "cudnn", 0),   # 256 and 240 patches: no common length, varlen everywhere
    ([(16, 16), (16, 16)], "varlen", 0),  # FIRESAFE_LONG_ATTN=varlen
])
def test_long_equal_segments_go_through_batched_sdpa(model, monkeypatch, grids, long_attn, long_calls):
    """The CUDA path's routing, on a CPU: varlen_attn stood in for by the batched-sdpa path (exact on fp32). Segments
    of LONG_SEGMENT patches or more, all of one length, take _long_sdpa; the result is transformers' own."""
    expected = vision(model, grids, "original", "linear")
    calls = Counter()
    long_sdpa = va._long_sdpa
    monkeypatch.setattr(va, "_use_varlen", lambda q: True)
    monkeypatch.setattr(va, "varlen_attn", lambda q, k, v, cu, cu_k, m, m_k, scale: calls.update(["varlen"]) or
                        va._grouped_sdpa(q, k, v, cu, scale))
    monkeypatch.setattr(va, "_long_sdpa", lambda *a: calls.update(["long"]) or long_sdpa(*a))
    monkeypatch.setattr(va, "LONG_SEGMENT", 100)  # the tiny tower's images are 256 patches, its windows 64
    try:
        va.apply("auto", "linear", "off", long_attn=long_attn)
        got = vision_forward(model, grids)
    finally:
        va.apply("auto", "linear", "auto", long_attn="cudnn")
    assert calls == Counter({"long": long_calls, "varlen": 4 - long_calls})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(va.CHOICES))
def test_each_knob_takes_its_choices_and_names_itself_when_refusing(name, monkeypatch):
    monkeypatch.delenv(name, raising=False)
    assert va.knob(name) == va.CHOICES[name][0]
    monkeypatch.setenv(name, f" {va.CHOICES[name][-1].upper()} ")
    assert va.knob(name) == va.CHOICES[name][-1]
    monkeypatch.setenv(name, "fast")
    with pytest.raises(ValueError, match=f"{name}='fast': expected one of"):
        va.knob(name)


# --------------------------------------------------------------------------- DeepSpeed ZeRO-3
def test_zero3_partitioned_tower_falls_back_where_weights_are_read(model, monkeypatch):
    """Every vision parameter empty except inside its owner module's forward (ZeRO-3): the patch embedding and the
    padded MLP, which read child modules' weights directly, take transformers' forward; the attention rewrite (it
    calls qkv and proj as modules) stays on. Same output as transformers' unpatched, unpartitioned tower."""
    from tests.swift_plugins.support import fake_zero3

    grids = [(12, 12), (16, 16)]
    expected = vision(model, grids, "original", "conv")
    calls = []
    grouped = va._grouped_sdpa
    monkeypatch.setattr(va, "_grouped_sdpa", lambda *a, **k: calls.append(1) or grouped(*a, **k))
    with fake_zero3(model.model.visual.modules()):
        assert model.model.visual.patch_embed.proj.weight.numel() == 0
        got = vision(model, grids, "sdpa", "linear", "pad")
    assert len(calls) == 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zero3_gathered_weights_are_not_padded_or_read(model, monkeypatch):
    """A ZeRO-3 parameter that happens to be gathered (prefetched) is still DeepSpeed's: the MLP padding, which
    re-stores gate/up weights as views of a padded copy, and the patch-embedding matmul must not touch it."""
    grids = [(12, 12)]
    expected = vision(model, grids, "original", "conv")
    visual = model.model.visual
    watched = [visual.patch_embed.proj.weight] + [p for b in visual.blocks for p in b.mlp.parameters()]
    calls = []

    def spy(name, fn):
        return lambda *a, **k: calls.append(name) or fn(*a, **k)

    monkeypatch.setattr(va, "_mlp_padding", spy("pad", va._mlp_padding))
    monkeypatch.setattr(va, "ORIGINAL_PATCH_EMBED_FORWARD", spy("embed", va.ORIGINAL_PATCH_EMBED_FORWARD))
    monkeypatch.setattr(va, "ORIGINAL_MLP_FORWARD", spy("mlp", va.ORIGINAL_MLP_FORWARD))
    for p in watched:
        p.ds_id = 0
    try:
        got = vision(model, grids, "sdpa", "linear", "pad")
    finally:
        for p in watched:
            del p.ds_id
    assert Counter(calls) == {"embed": 1, "mlp": 4}  # transformers' Conv3d and MLP forward, no padding
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    calls.clear()
    vision(model, grids, "sdpa", "linear", "pad")  # the control: without DeepSpeed's marks both patches run
    assert "pad" in calls and "embed" not in calls


def test_norm_traced_into_a_compiled_graph_compiles_once(model):
    """Inside a compiled decoder layer (SCORE_COMPILE_LLM, FIRESAFE_COMPILE_LAYERS) the RMSNorm leaves its module
    as it found it, so the next call with the same shapes reuses the graph: run X's cold test.sh compiled every
    layer again on the second batch when the norm cached its eps tensor on the module while being traced."""
    from torch._dynamo.testing import CompileCounter

    norm = model.model.language_model.norm
    norm.__dict__.pop("_firesafe_eps", None)  # as a freshly loaded model has it
    x = torch.randn(2, 5, 64)
    expected = va.ORIGINAL_NORM_FORWARD(norm, x)
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        va.apply(compile="on")
        compiled = torch.compile(norm, backend=counter)
        with torch.no_grad():
            got = [compiled(x) for _ in range(3)]
    finally:
        va.apply(compile="auto")
        torch._dynamo.reset()
    assert counter.frame_count == 1
    for g in got:
        torch.testing.assert_close(g, expected, rtol=0, atol=1e-6)
