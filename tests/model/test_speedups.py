"""Scoring speed-ups (tools.model.speedups): the LoRA adapter merged into the base weights, float8 linear layers,
compiled decoder layers; each leaves the probabilities where the rounding puts them, and the knobs are checked."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.helpers import write_image
from tests.model.support import TINY
from tools.demo.models import build_tiny_model
from tools.model import infer as S
from tools.model import speedups as F
from tools.task import PROMPT, sft_row


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2.5-VL's folder and four image rows."""
    root = tmp_path_factory.mktemp("speedups")
    model_dir = build_tiny_model(root / "model", TINY, seed=0)
    rows = [sft_row(write_image(root / f"{i}.jpg", colour=(40 * i, 90, 200 - 30 * i), size=(56, 56)), None)
            for i in range(4)]
    return model_dir, rows


def fresh(model_dir):
    """(template, label ids) of the tiny model loaded as test.sh loads it, unmerged: a new copy for each test,
    since the speed-ups change the model in place."""
    _, template, label_ids, _ = S.load(["--model", str(model_dir), "--template", "qwen2_5_vl", "--torch_dtype",
                                        "float32", "--max_pixels", "3136"], merge=False)
    return template, label_ids


def _score(model, template, label_ids, rows):
    template.model = model
    return S.score_rows(model, template, label_ids, rows, batch_size=2, progress=False, workers=0)


def _lora(base):
    """A LoRA adapter whose B matrices are not zero (a trained adapter changes outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model.eval()


def test_merged_scores_equal_the_adapter_scores(tiny):
    model_dir, rows = tiny
    template, label_ids = fresh(model_dir)
    peft_model = _lora(template.model)
    with_adapter = _score(peft_model, template, label_ids, rows)
    with peft_model.disable_adapter():
        without = _score(peft_model, template, label_ids, rows)
    assert np.abs(with_adapter - without).max() > 1e-4  # the adapter matters: the test can see a lost merge
    base_only = peft_model.get_base_model()
    merged = F.merge_lora(peft_model)
    assert merged is base_only and not any("lora_" in n for n, _ in merged.named_parameters())
    np.testing.assert_allclose(_score(merged, template, label_ids, rows), with_adapter, atol=2e-6)


def test_knobs(monkeypatch):
    cpu = torch.nn.Linear(2, 2)
    for name in ("SCORE_MERGE", "SCORE_FP8", "SCORE_COMPILE_LLM"):
        monkeypatch.delenv(name, raising=False)
    assert F.policy() == {"SCORE_MERGE": "auto", "SCORE_FP8": "0"}
    assert F.merge_wanted(cpu) is False  # auto: a model on the CPU keeps its adapter
    assert F.compile_wanted(cpu) is False
    monkeypatch.setenv("SCORE_MERGE", "1")
    assert F.merge_wanted(cpu) is True
    monkeypatch.setenv("SCORE_MERGE", "0")
    monkeypatch.setenv("SCORE_FP8", "1")
    assert F.merge_wanted(cpu) is True  # float8 replaces plain linear layers: the adapter is merged first
    monkeypatch.setenv("SCORE_COMPILE_LLM", "1")
    assert F.compile_wanted(cpu) is True
    for name, expected in (("SCORE_MERGE", "auto, 0 or 1"), ("SCORE_FP8", "0 or 1"),
                           ("SCORE_COMPILE_LLM", "auto, 0 or 1")):
        monkeypatch.setenv(name, "yes")
        with pytest.raises(ValueError, match=f"{name}='yes': expected {expected}"):
            F.knob(name)
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("SCORE_FP8", "auto")  # no auto for float8
    with pytest.raises(ValueError, match="SCORE_FP8='auto': expected 0 or 1"):
        F.policy()
    monkeypatch.setenv("SCORE_FP8", "0")
    assert F.merge_lora(cpu) is cpu  # not a PEFT model: unchanged
    assert F.apply(cpu) is cpu  # every knob off: nothing touched


class _OnCuda(torch.nn.Module):
    """Answers where a model lives as a CUDA model would, without a GPU."""

    def __init__(self, dtype):
        super().__init__()
        self.device, self.dtype = torch.device("cuda"), dtype


def test_auto_merges_and_compiles_a_half_precision_model_on_cuda(monkeypatch):
    for name in ("SCORE_MERGE", "SCORE_FP8", "SCORE_COMPILE_LLM", "FIRESAFE_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    assert F.merge_wanted(_OnCuda(torch.bfloat16)) and F.merge_wanted(_OnCuda(torch.float16))
    assert not F.merge_wanted(_OnCuda(torch.float32))  # nothing to gain, and the adapter stays exact
    assert F.compile_wanted(_OnCuda(torch.bfloat16))
    monkeypatch.setenv("FIRESAFE_COMPILE", "off")  # what choose_compile sets for a small test set
    assert not F.compile_wanted(_OnCuda(torch.bfloat16))
    monkeypatch.setenv("SCORE_MERGE", "0")
    assert not F.merge_wanted(_OnCuda(torch.bfloat16))


def test_fp8_replaces_the_language_model_linears_only(tiny, monkeypatch):
    model_dir, rows = tiny
    template, label_ids = fresh(model_dir)
    model = template.model
    before = _score(model, template, label_ids, rows)
    n = F.to_fp8(model, check_device=False)
    assert n == 7 * TINY.layers
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert all(kind == "Fp8Linear" for name, kind in kinds.items() if F.LLM_LINEAR.search(name))
    assert not any(kind == "Fp8Linear" for name, kind in kinds.items() if "visual" in name or "lm_head" in name)
    after = _score(model, template, label_ids, rows)
    assert np.abs(after - before).max() < 0.05 and np.abs(after - before).max() > 0
    assert F.to_fp8(model, check_device=False) == 0  # already float8: nothing left to replace
    with pytest.raises(F.SpeedupError, match="no language-model linear layers"):
        F.to_fp8(model.visual, check_device=False)


def test_fp8_refuses_an_unmerged_adapter_and_a_cpu(tiny):
    model_dir, _ = tiny
    template, _ = fresh(model_dir)
    with pytest.raises(F.SpeedupError, match="merge the adapter first"):
        F.to_fp8(_lora(template.model), check_device=False)
    if not torch.cuda.is_available():
        with pytest.raises(F.SpeedupError, match="SCORE_FP8=1: no CUDA GPU; run test.sh with SCORE_FP8=0"):
            F.to_fp8(template.model)


def test_compiled_layers_score_the_same(tiny, monkeypatch):
    model_dir, rows = tiny
    template, label_ids = fresh(model_dir)
    monkeypatch.setenv("SCORE_COMPILE_LLM", "1")  # a graph for the four images' shape too
    model = template.model
    before = _score(model, template, label_ids, rows)
    assert not F.has_compiled_layers(model)
    assert F.compile_layers(model) == TINY.layers
    assert all(layer._compiled_call_impl is not None for layer in F.decoder_layers(model))
    assert F.has_compiled_layers(model)  # tools.model.infer.score_rows fills its last batch up for this model
    np.testing.assert_allclose(_score(model, template, label_ids, rows), before, atol=1e-5)
    with pytest.raises(F.SpeedupError, match="no language_model.layers"):
        F.decoder_layers(torch.nn.Linear(2, 2))


def test_a_padded_batch_of_the_common_shape_runs_eagerly(tiny, tmp_path, monkeypatch, capsys):
    """Bucketing puts rows of two sizes in one batch where one size ends; that batch is padded, and a padded batch
    needs a graph of its own (an attention mask instead of none): it runs eagerly unless padded batches are
    common enough to pay for one."""
    from torch._dynamo.testing import CompileCounter

    model_dir, rows = tiny
    short = sft_row(write_image(tmp_path / "short.jpg", colour=(10, 200, 60), size=(56, 56)), None,
                    prompt=PROMPT[:-4])  # a shorter sequence: sorted first, batched with a usual row, padded
    template, label_ids = fresh(model_dir)
    # where the load's time went, for the start-up limit on the GPU
    assert re.search(r"load: importing swift [\d.]+ s, model and adapter [\d.]+ s, speed-ups [\d.]+ s",
                     capsys.readouterr().out)
    model = template.model
    eager = _score(model, template, label_ids, rows + [short])
    counter = CompileCounter()
    torch._dynamo.reset()
    for layer in F.decoder_layers(model):
        layer.compile(backend=counter, dynamic=False)
    monkeypatch.delenv("SCORE_COMPILE_LLM", raising=False)
    monkeypatch.setenv("SCORE_COMPILE_MIN_IMAGES", "4")
    try:
        _score(model, template, label_ids, rows)  # the usual shape, unpadded: its graph
        graphs = counter.frame_count
        assert graphs > 0
        np.testing.assert_allclose(_score(model, template, label_ids, rows + [short]), eager, atol=1e-5)
        assert counter.frame_count == graphs  # [short, usual] ran eagerly, no graph for its mask
    finally:
        torch._dynamo.reset()


def test_a_shape_too_rare_for_a_graph_runs_eagerly(tiny, tmp_path, monkeypatch):
    """With compiled layers, a graph is compiled only for a shape that enough images have
    (SCORE_COMPILE_MIN_IMAGES), the rest run the layers' eager code; SCORE_COMPILE_LLM=1 compiles every shape.
    A counting backend stands for inductor: each compiled graph is one backend call."""
    from torch._dynamo.testing import CompileCounter

    model_dir, rows = tiny
    rare = [sft_row(write_image(tmp_path / f"x{i}.jpg", colour=(200, 30 * i, 60), size=(56, 56)), None,
                    prompt=PROMPT + "，请仔细看") for i in range(2)]  # a longer prompt: another sequence length
    rows = rows + rare  # batch 2: two batches of the usual shape, one of the rare one
    template, label_ids = fresh(model_dir)
    model = template.model
    eager = _score(model, template, label_ids, rows)
    counter = CompileCounter()
    torch._dynamo.reset()
    for layer in F.decoder_layers(model):  # as compile_layers does, with the counting backend
        layer.compile(backend=counter, dynamic=False)
    monkeypatch.delenv("SCORE_COMPILE_LLM", raising=False)
    try:
        np.testing.assert_allclose(_score(model, template, label_ids, rows), eager, atol=1e-5)
        assert counter.frame_count == 0  # 4 and 2 images: under the default 800, no graph pays
        monkeypatch.setenv("SCORE_COMPILE_MIN_IMAGES", "4")
        np.testing.assert_allclose(_score(model, template, label_ids, rows), eager, atol=1e-5)
        graphs = counter.frame_count
        assert graphs > 0 and F.has_compiled_layers(model)  # the usual shape compiled; the eager calls put back
        _score(model, template, label_ids, rows)
        assert counter.frame_count == graphs  # the usual shape's graph reused, the rare one still eager
        monkeypatch.setenv("SCORE_COMPILE_LLM", "1")
        np.testing.assert_allclose(_score(model, template, label_ids, rows), eager, atol=1e-5)
        assert counter.frame_count > graphs  # now the rare shape has its graph too
    finally:
        torch._dynamo.reset()
