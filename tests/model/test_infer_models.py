"""tools.model.infer with what a run recorded of its model: labels, prompt, head or text answer, prior correction."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tools.fileio import write_json, write_jsonl
from tools.model import infer as S
from tools.probs import read_probs
from tools.task import BINARY_LABELS, BINARY_PROMPT, PROMPT, TRAINED_ON, sft_row


def test_a_classification_head_is_read_as_its_softmax():
    class Head(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, **inputs):
            return SimpleNamespace(logits=inputs["x"])

    template = SimpleNamespace(pre_forward_hook=lambda model, args, inputs: (args, inputs))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    probs = S.forward_probs(Head(), template, {"x": x}, None)
    np.testing.assert_allclose(probs.numpy(), torch.softmax(x, -1).numpy(), atol=1e-7)


@pytest.fixture
def binary_run(tmp_path):
    """A run folder as train.sh leaves it, for a binary specialist trained on 30 % 高风险 rows."""
    ckpt = tmp_path / "stage2" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
    write_json(tmp_path / "stage2" / TRAINED_ON, {
        "fingerprint": {"digest": "x", "parts": {}}, "task": "causal_lm", "labels": list(BINARY_LABELS),
        "prompt": BINARY_PROMPT, "class_shares": {"labels": list(BINARY_LABELS), "trained": [0.3, 0.7],
                                                  "real": [0.03, 0.97]}})
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [sft_row(tmp_path / f"{i}.jpg", None) for i in range(3)])  # rows carry the task prompt
    return ckpt, rows


def test_score_jobs_asks_with_the_models_prompt_and_corrects_its_prior(binary_run, tmp_path, monkeypatch):
    ckpt, rows = binary_run
    seen = {}

    def fake_load(argv, merge=None, labels=None):
        seen["labels"] = labels
        return object(), object(), [1, 2], None

    def fake_score_rows(model, template, label_ids, rows, batch_size, **kw):
        seen.update(prompt=kw["prompt"], n_labels=kw["n_labels"])
        return np.tile([0.6, 0.4], (len(rows), 1))

    monkeypatch.setattr(S, "load", fake_load)
    monkeypatch.setattr(S, "score_rows", fake_score_rows)
    monkeypatch.delenv("PRIOR_CORRECTION", raising=False)
    out = tmp_path / "stage2" / "test_probs.csv"
    S.score_jobs([(ckpt, [(rows, out)])], [], 2)
    assert seen == {"labels": BINARY_LABELS, "prompt": BINARY_PROMPT, "n_labels": 2}
    names, probs = read_probs(out)
    assert out.read_text(encoding="utf-8").splitlines()[0] == "image," + ",".join(BINARY_LABELS)
    expected = np.array([0.6 * 0.03 / 0.3, 0.4 * 0.97 / 0.7])
    np.testing.assert_allclose(probs[0], expected / expected.sum(), atol=1e-6)
    record = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["prior_corrected"] is True and record["prompt"] == BINARY_PROMPT

    monkeypatch.setenv("PRIOR_CORRECTION", "0")  # another record: scored again, uncorrected
    S.score_jobs([(ckpt, [(rows, out)])], [], 2)
    np.testing.assert_allclose(read_probs(out)[1][0], [0.6, 0.4], atol=1e-6)


def test_a_checkpoint_without_a_record_is_a_five_label_model(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    model = S.model_of(ckpt)
    assert model["labels"][0] == "高风险" and len(model["labels"]) == 5
    assert model["prompt"] == PROMPT and model["task"] == "causal_lm" and model["class_shares"] is None
