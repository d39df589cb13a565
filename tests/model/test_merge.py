"""Scoring with the LoRA adapter merged into the base weights: the same probabilities, fewer matmuls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import write_image
from tests.model.support import TINY
from tools.demo.models import build_tiny_model
from tools.model import infer as S
from tools.task import sft_row



@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """A tiny Qwen2.5-VL with a LoRA adapter whose B matrices are not zero (a trained adapter changes outputs)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge")
    model_dir = build_tiny_model(root / "model", TINY, seed=0)
    _, template, label_ids, _ = S.load(["--model", str(model_dir), "--template", "qwen2_5_vl", "--torch_dtype",
                                        "float32", "--max_pixels", "3136"], merge=False)
    base = template.model
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval()
    rows = [sft_row(write_image(root / f"{i}.jpg", colour=(40 * i, 90, 200 - 30 * i), size=(56, 56)), None)
            for i in range(4)]
    return peft_model, template, label_ids, rows


def test_merged_scores_equal_the_adapter_scores(lora_model):
    peft_model, template, label_ids, rows = lora_model
    template.model = peft_model
    with_adapter = S.score_rows(peft_model, template, label_ids, rows, batch_size=2, progress=False, workers=0)
    base_only = peft_model.get_base_model()
    with peft_model.disable_adapter():
        without = S.score_rows(peft_model, template, label_ids, rows, batch_size=2, progress=False, workers=0)
    assert np.abs(with_adapter - without).max() > 1e-4  # the adapter matters: the test can see a lost merge
    merged = S.merge_lora(peft_model)
    template.model = merged
    assert merged is base_only and not any("lora_" in n for n, _ in merged.named_parameters())
    after = S.score_rows(merged, template, label_ids, rows, batch_size=2, progress=False, workers=0)
    np.testing.assert_allclose(after, with_adapter, atol=2e-6)


def test_merge_policy(monkeypatch):
    cpu = torch.nn.Linear(2, 2)
    monkeypatch.delenv("SCORE_MERGE", raising=False)
    assert S.merge_wanted(cpu) is False  # off by default (bf16 rounding moves the probabilities)
    monkeypatch.setenv("SCORE_MERGE", "1")
    assert S.merge_wanted(cpu) is True
    monkeypatch.setenv("SCORE_MERGE", "yes")
    with pytest.raises(ValueError, match="SCORE_MERGE"):
        S.merge_wanted(cpu)
    assert S.merge_lora(cpu) is cpu  # not a PEFT model: unchanged
