"""swift_plugins/loss.py (weighted_ce) and the answer spans it weighs (swift_plugins/_common.py), against
references computed by hand on a tiny Qwen2.5-VL's logits."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import base_args, forward_logits, stub_trainer, training_batch
from tools.task import CLASS_WEIGHTS, HIGH_RISK, LABEL_TO_INDEX, LABELS


def test_class_weights_from_env(monkeypatch):
    from swift_plugins._common import ENV_CLASS_WEIGHTS, class_weights_from_env, focal_gamma_from_env

    monkeypatch.delenv(ENV_CLASS_WEIGHTS, raising=False)
    assert class_weights_from_env() == [CLASS_WEIGHTS[label] for label in LABELS]
    assert max(class_weights_from_env()) == CLASS_WEIGHTS[HIGH_RISK]
    monkeypatch.setenv(ENV_CLASS_WEIGHTS, "3,2,1,0.5,1")
    assert class_weights_from_env() == [3, 2, 1, 0.5, 1]
    monkeypatch.setenv(ENV_CLASS_WEIGHTS, f"{HIGH_RISK}=4")
    assert class_weights_from_env() == [4 if label == HIGH_RISK else CLASS_WEIGHTS[label] for label in LABELS]
    for bad in ("1,2", "风险=1", "1,1,1,1,-1"):
        monkeypatch.setenv(ENV_CLASS_WEIGHTS, bad)
        with pytest.raises(ValueError):
            class_weights_from_env()
    monkeypatch.setenv("FIRESAFE_FOCAL_GAMMA", "")
    assert focal_gamma_from_env() == 0.0
    monkeypatch.setenv("FIRESAFE_FOCAL_GAMMA", "-1")
    with pytest.raises(ValueError, match="FIRESAFE_FOCAL_GAMMA"):
        focal_gamma_from_env()


def make_loss(template, monkeypatch, weights: str, gamma: float, **trainer_kw):
    from swift_plugins.loss import WeightedCrossEntropy

    monkeypatch.setenv("FIRESAFE_CLASS_WEIGHTS", weights)
    monkeypatch.setenv("FIRESAFE_FOCAL_GAMMA", str(gamma))
    return WeightedCrossEntropy(None, stub_trainer(template, **trainer_kw))


@pytest.fixture(scope="module")
def lm_batch(loaded, data):
    model, template = loaded
    rows = data["train_rows"][:6]  # every label once, 高风险 twice
    logits, labels = training_batch(model, template, rows)
    gold = torch.tensor([LABEL_TO_INDEX[r["messages"][-1]["content"]] for r in rows])
    return logits, labels, gold


def reference_token_loss(logits, labels):
    """[B, T-1] -log p(next token) by log-softmax, and the supervised mask; independent of F.cross_entropy."""
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -logp * mask, mask


def test_weighted_ce_generative_is_standard_ce_with_unit_weights(loaded, lm_batch, monkeypatch):
    logits, labels, _ = lm_batch
    loss = make_loss(loaded[1], monkeypatch, "1,1,1,1,1", 0)(SimpleNamespace(logits=logits), labels)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_weighted_ce_generative_scales_each_sample_by_its_weight(loaded, lm_batch, monkeypatch):
    logits, labels, gold = lm_batch
    ce, mask = reference_token_loss(logits, labels)
    n = mask.sum()
    weights = torch.tensor([3.0, 1.5, 0.5, 1.0, 2.5])
    loss = make_loss(loaded[1], monkeypatch, ",".join(map(str, weights.tolist())), 0)(SimpleNamespace(logits=logits),
                                                                                       labels)
    torch.testing.assert_close(loss, (weights[gold] * ce.sum(1)).sum() / n, rtol=1e-5, atol=1e-6)
    # Raising one class's weight by 1 adds exactly that class's samples' CE (sum over their tokens / n).
    bumped = weights.clone()
    bumped[LABEL_TO_INDEX[HIGH_RISK]] += 1
    loss2 = make_loss(loaded[1], monkeypatch, ",".join(map(str, bumped.tolist())), 0)(SimpleNamespace(logits=logits),
                                                                                       labels)
    high = gold == LABEL_TO_INDEX[HIGH_RISK]
    assert high.sum() == 2
    torch.testing.assert_close(loss2 - loss, ce[high].sum() / n, rtol=1e-4, atol=1e-6)


def test_weighted_ce_generative_focal_term(loaded, lm_batch, monkeypatch):
    logits, labels, gold = lm_batch
    ce, mask = reference_token_loss(logits, labels)
    gamma = 2.0
    focal = (1 - torch.exp(-ce)) ** gamma * ce  # FL = -(1 - p)^γ log p
    w = torch.tensor([CLASS_WEIGHTS[label] for label in LABELS])
    loss = make_loss(loaded[1], monkeypatch, "", gamma)(SimpleNamespace(logits=logits), labels)
    torch.testing.assert_close(loss, (w[gold] * (focal * mask).sum(1)).sum() / mask.sum(), rtol=1e-5, atol=1e-7)
    assert loss < make_loss(loaded[1], monkeypatch, "", 0)(SimpleNamespace(logits=logits), labels)


def test_answer_classes_split_packed_answers(loaded):
    """Two answers in one row (packing, or swift compacting a batch of one) keep their own classes."""
    from swift_plugins._common import AnswerTokens

    tok = loaded[1].tokenizer
    t = AnswerTokens(tok)

    def answer(label):
        return tok.encode(label, add_special_tokens=False) + [t.im_end, t.newline]

    high, other = answer(HIGH_RISK), answer(LABELS[-1])
    row = [-100, -100] + high + other + [-100] + answer(LABELS[2])
    classes = t.position_classes(torch.tensor([row, [-100] * (len(row) - len(other)) + other]))
    expected = [-1, -1] + [0] * len(high) + [4] * len(other) + [-1] + [2] * len(answer(LABELS[2]))
    assert classes[0].tolist() == expected
    assert classes[1].tolist() == [-1] * (len(row) - len(other)) + [4] * len(other)
    no_newline = [-100] + high[:-1] + other[:-1]  # a template without the newline after <|im_end|>
    assert t.position_classes(torch.tensor([no_newline])).tolist()[0] == [-1] + [0] * (len(high) - 1) + [4] * (
        len(other) - 1)



def test_answer_classes_match_a_per_row_walk(loaded):
    """position_classes (a running maximum over the flattened batch, no boolean indexing) against a plain walk
    over each row, on random left-padded batches of answers, gaps and rows without any; the label ids are copied
    to a device once."""
    from swift_plugins._common import AnswerTokens

    tok = loaded[1].tokenizer
    t = AnswerTokens(tok)
    answers = [tok.encode(label, add_special_tokens=False) + [t.im_end, t.newline] for label in LABELS]

    def walk(row):
        out, current, prev_sup, prev_last = [], -1, False, False
        for i, token in enumerate(row):
            sup = token != -100
            is_last = (token == t.im_end and (i + 1 == len(row) or row[i + 1] != t.newline)) or (
                token == t.newline and i > 0 and row[i - 1] == t.im_end)
            if sup and (not prev_sup or prev_last):
                current = next((k for k, a in enumerate(answers) if a[0] == token), -1)
            out.append(current if sup else -1)
            prev_sup, prev_last = sup, is_last
        return out

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = []
        for _ in range(3):
            row = []
            for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
                row += [-100] * int(torch.randint(0, 3, (1,), generator=gen))
                row += answers[int(torch.randint(0, len(LABELS), (1,), generator=gen))]
            rows.append(row)
        width = max(len(r) for r in rows) + 1
        batch = [[-100] * (width - len(r)) + r for r in rows]  # left padding, as swift pads
        assert t.position_classes(torch.tensor(batch)).tolist() == [walk(r) for r in batch]
    assert list(t._on_device) == [torch.device("cpu")]

@pytest.fixture(scope="module")
def cls_batch(tiny_model, data):
    """Class logits [B, 5] of the seq_cls variant (`--task_type seq_cls --num_labels 5`) and the gold indices."""
    from tools.model.infer import load

    model, template, _, _ = load(base_args(tiny_model) + ["--task_type", "seq_cls", "--num_labels", "5"])
    rows = data["train_rows"][:8]
    logits = forward_logits(model, template, rows)
    assert logits.shape == (8, len(LABELS))
    return logits, torch.tensor([LABEL_TO_INDEX[r["messages"][-1]["content"]] for r in rows]), template


def test_weighted_ce_seq_cls(cls_batch, monkeypatch):
    logits, gold, template = cls_batch
    out = SimpleNamespace(logits=logits)
    loss = make_loss(template, monkeypatch, "1,1,1,1,1", 0)(out, gold)
    torch.testing.assert_close(loss, F.cross_entropy(logits, gold), rtol=1e-6, atol=1e-7)
    weights = torch.tensor([3.0, 1.5, 0.5, 1.0, 2.5])
    ce = -torch.log_softmax(logits, -1).gather(-1, gold[:, None]).squeeze(-1)
    loss = make_loss(template, monkeypatch, ",".join(map(str, weights.tolist())), 0)(out, gold)
    torch.testing.assert_close(loss, (weights[gold] * ce).mean(), rtol=1e-6, atol=1e-7)
    loss = make_loss(template, monkeypatch, ",".join(map(str, weights.tolist())), 1.5)(out, gold)
    torch.testing.assert_close(loss, (weights[gold] * (1 - torch.exp(-ce)) ** 1.5 * ce).mean(), rtol=1e-5, atol=1e-7)
    # In training with 2 accumulation steps the per-batch mean is halved, as HF does for the model's own loss.
    halved = make_loss(template, monkeypatch, "1,1,1,1,1", 0, training=True, accumulation=2)(out, gold)
    torch.testing.assert_close(halved, F.cross_entropy(logits, gold) / 2, rtol=1e-6, atol=1e-7)
