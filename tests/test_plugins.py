"""swift_plugins/: the weighted loss, the High-Risk Feature Amplifier, the weighted-F1 metric, the stats callback
and train.sh's plugin flags, on a tiny random Qwen2.5-VL of the demo's stage-2 shape (tools.make_demo)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import write_image
from tools.task import CLASS_WEIGHTS, HIGH_RISK, LABEL_TO_INDEX, LABELS, sft_row

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = "3136"  # 56 x 56 images: 4 visual tokens each, to keep every forward pass cheap


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tools.make_demo import SPECS, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "stage2", SPECS["stage2"], seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Rows with every label (train: 12, val: 5), as data-pre.sh writes them."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 12), ("val", 5)):
        rows = []
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            image = write_image(root / split / f"{i}.jpg", tuple(int(c) for c in rng.integers(0, 255, 3)), (56, 56))
            rows.append(sft_row(image, label))
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        out[split], out[f"{split}_rows"] = path, rows
    return out


def base_args(model_dir: Path, train: bool = False) -> list[str]:
    return ["--model", str(model_dir), "--template", "qwen2_5_vl", "--torch_dtype", "float32",
            "--max_pixels", MAX_PIXELS] + (["--check_model", "false"] if train else [])


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """(model, template) prepared by swift as tools.score does, without adapters."""
    from tools.score import load

    model, template, _, _ = load(base_args(tiny_model))
    return model, template


def stub_trainer(template, training=False, accumulation=1):
    """What the loss and metric read from swift's trainer."""
    return SimpleNamespace(template=template, model=SimpleNamespace(training=training), model_accepts_loss_kwargs=False,
                           args=SimpleNamespace(gradient_accumulation_steps=accumulation),
                           current_gradient_accumulation_steps=accumulation)


def training_batch(model, template, rows):
    """(logits [B, T, V], labels [B, T]) of a supervised batch, encoded and run the way swift trains."""
    template.set_mode("train")
    try:
        batch = template.data_collator([template.encode(r) for r in rows])
        _, inputs = template.pre_forward_hook(model, None, batch)
        labels = inputs.pop("labels")
        inputs.pop("loss_scale", None)
        with torch.no_grad():
            logits = model(**inputs).logits.float()
    finally:
        template.set_mode("transformers")
    return logits, labels


def last_logits(model, template, rows) -> torch.Tensor:
    """[B, V] next-token logits after each prompt (answers dropped), one padded batch, as tools.score runs."""
    return forward_logits(model, template, rows)[:, -1]


def forward_logits(model, template, rows) -> torch.Tensor:
    """The model's logits on the prompts of `rows` (answers dropped), in inference mode."""
    from swift.infer_engine import InferRequest
    from swift.utils import to_device

    encoded = [template.encode(InferRequest(messages=[m for m in r["messages"] if m["role"] != "assistant"],
                                            images=r["images"])) for r in rows]
    inputs = to_device(template.data_collator(encoded), model.device)
    _, inputs = template.pre_forward_hook(model, None, inputs)
    inputs.pop("labels", None)
    with torch.no_grad():
        return model(**inputs).logits.float()


# --------------------------------------------------------------------------- plugin files
def test_plugin_list_is_every_public_file():
    from swift_plugins import PLUGIN_DIR, plugin_files

    out = subprocess.run([sys.executable, "-m", "swift_plugins", "--list"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")[:-1]
    expected = sorted(str(p) for p in PLUGIN_DIR.glob("*.py") if not p.name.startswith("_"))
    assert out == expected == [str(p) for p in plugin_files()]
    assert {"loss.py", "tuner.py", "metric.py", "callback.py"} <= {Path(p).name for p in out}
    assert all(Path(p).is_absolute() for p in out)


def test_plugins_register_into_swift_maps():
    from swift.callbacks import callbacks_map
    from swift.loss import loss_map
    from swift.metrics import eval_metrics_map
    from swift.tuner_plugin import tuners_map
    from swift.utils import import_external_file

    for path in ("loss.py", "tuner.py", "metric.py", "callback.py"):
        import_external_file(str(ROOT / "swift_plugins" / path))  # the way --external_plugins loads them
    assert loss_map["weighted_ce"].__name__ == "WeightedCrossEntropy"
    assert tuners_map["hr_amplifier"].__name__ == "HighRiskAmplifierTuner"
    assert eval_metrics_map["weighted_f1"].__name__ == "WeightedF1Metrics"
    assert callbacks_map["amplifier_stats"].__name__ == "AmplifierStatsCallback"


# --------------------------------------------------------------------------- loss
def test_class_weights_from_env(monkeypatch):
    from swift_plugins._common import ENV_CLASS_WEIGHTS, class_weights_from_env

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


@pytest.fixture(scope="module")
def cls_batch(tiny_model, data):
    """Class logits [B, 5] of the seq_cls variant (`--task_type seq_cls --num_labels 5`) and the gold indices."""
    from tools.score import load

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


# --------------------------------------------------------------------------- metric
def test_metric_matches_hand_computed_confusion(loaded):
    from transformers.trainer_utils import EvalPrediction

    from swift_plugins.metric import WeightedF1Metrics

    metric = WeightedF1Metrics(None, stub_trainer(loaded[1]))
    gold = [0, 0, 0, 1, 1, 2, 3, 3, 3, 4, -1]  # the last row's answer is not a label: ignored
    pred = [0, 0, 1, 1, 2, 2, 3, 3, 0, 4, 3]
    # Confusion (rows gold): 高 [2 1 0 0 0], 中 [0 1 1 0 0], 低 [0 0 1 0 0], 无 [1 0 0 2 0], 非 [0 0 0 0 1]
    # F1 = 2·tp / (predicted + actual): 高 4/6, 中 2/4, 低 2/3, 无 4/5, 非 2/2.
    f1 = [4 / 6, 2 / 4, 2 / 3, 4 / 5, 1.0]
    out = metric.compute_metrics(EvalPrediction(predictions=np.array(list(zip(pred, gold))), label_ids=None))
    assert out["weighted_f1"] == pytest.approx(2 * f1[0] + 1.5 * f1[1] + f1[2] + f1[3] + f1[4])
    assert out["weighted_f1"] == pytest.approx(4.55)
    assert out["high_risk_recall"] == pytest.approx(2 / 3)
    assert out["high_risk_precision"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(7 / 10)
    for label, value in zip(LABELS, f1):
        assert out[f"f1_{label}"] == pytest.approx(value)


def test_metric_reads_prediction_at_answer_start(loaded):
    from swift_plugins._common import AnswerTokens
    from swift_plugins.metric import WeightedF1Metrics

    tok = loaded[1].tokenizer
    metric = WeightedF1Metrics(None, stub_trainer(loaded[1]))
    ids = AnswerTokens(tok).label_ids
    vocab = len(tok) + 8
    labels = torch.full((3, 6), -100)
    labels[0, 3:5] = torch.tensor([ids[0], 7])   # gold 高风险, answer starts at 3
    labels[1, 2:4] = torch.tensor([ids[3], 7])   # gold 无风险, answer starts at 2
    labels[2, 4] = 11                            # an answer that is not a label
    logits = torch.zeros(3, 6, vocab)
    logits[0, 2, ids[1]] = 5.0                   # position 2 predicts position 3: 中风险
    logits[0, 3, ids[0]] = 9.0                   # (the next position must not be read)
    logits[1, 1, ids[3]] = 5.0
    logits[1, 1, 100] = 50.0                     # a non-label token wins overall but is not a label
    pairs = metric.preprocess_logits_for_metrics(logits, labels)
    assert pairs.tolist() == [[1, 0], [3, 3], [pairs[2, 0].item(), -1]]
    seq_cls = metric.preprocess_logits_for_metrics(torch.tensor([[0., 3, 1, 0, 0], [5., 0, 0, 0, 1]]),
                                                   torch.tensor([1, 4]))
    assert seq_cls.tolist() == [[1, 1], [0, 4]]


# --------------------------------------------------------------------------- amplifier at initialisation
def sft_args(model_dir: Path, tmp: Path, tuner: str):
    from swift.arguments import SftArguments
    from swift.utils import parse_args

    with pytest.MonkeyPatch.context() as mp:  # parsing sets TENSORBOARD_LOGGING_DIR if unset: keep it local
        mp.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        args, rest = parse_args(SftArguments, base_args(model_dir, train=True) + [
            "--dataset", str(tmp / "none.jsonl"), "--output_dir", str(tmp / "out"), "--add_version", "false",
            "--tuner_type", tuner, "--lora_rank", "4"])
    assert not rest
    return args


def test_amplifier_starts_as_plain_lora_and_is_applied(tiny_model, data, tmp_path, loaded):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from swift.pipelines.train.tuner import prepare_adapter

    from swift_plugins._amplifier import find_amplifier
    from swift_plugins.tuner import HighRiskAmplifierTuner

    base, template = copy.deepcopy(loaded[0]), loaded[1]
    torch.manual_seed(0)
    plain = prepare_adapter(sft_args(tiny_model, tmp_path, "lora"), copy.deepcopy(base))
    torch.manual_seed(0)
    amplified = HighRiskAmplifierTuner.prepare_model(sft_args(tiny_model, tmp_path, "hr_amplifier"), base)
    amp = find_amplifier(amplified)
    assert amp is not None and amp.config.layers == [0, 1, 2]
    assert all(p.requires_grad for p in amp.parameters())
    # Same LoRA in both, and not the identity (LoRA B starts at zero), so the comparison is against LoRA.
    torch.manual_seed(1)
    lora = {k: torch.randn_like(v) * 0.2 for k, v in get_peft_model_state_dict(plain).items()}
    set_peft_model_state_dict(plain, lora)
    set_peft_model_state_dict(amplified, lora)
    plain.eval(), amplified.eval()
    short = copy.deepcopy(data["val_rows"][0])
    short["messages"][0]["content"] = "<image>楼道？"
    batches = {"padded": [*data["val_rows"][:3], short], "single": data["val_rows"][:1]}
    reference = {k: last_logits(plain, template, rows) for k, rows in batches.items()}
    base_logits = last_logits(loaded[0], template, batches["padded"])
    assert (reference["padded"] - base_logits).abs().max() > 1e-3  # the LoRA does something
    for key, rows in batches.items():
        torch.testing.assert_close(last_logits(amplified, template, rows), reference[key], rtol=0, atol=1e-5)

    # Each part really enters the forward pass: moving it moves the logits.
    with torch.no_grad():
        amp.gate.channel.fill_(0.5)
        gate_only = last_logits(amplified, template, batches["padded"])
        amp.gate.channel.zero_()
        amp.attn_bias.fill_(2.0)
        bias_only = {k: last_logits(amplified, template, rows) for k, rows in batches.items()}
        amp.enabled = False  # hooks pass through: plain LoRA again
        off = last_logits(amplified, template, batches["padded"])
    for moved in (gate_only, bias_only["padded"], bias_only["single"]):
        assert (moved - reference["padded" if moved.shape[0] > 1 else "single"]).abs().max() > 1e-4
    torch.testing.assert_close(off, reference["padded"], rtol=0, atol=1e-5)


def test_attention_bias_is_a_logit_bias_on_image_keys(tiny_model, loaded):
    """The hook's mask equals the reference: causal mask + β[h] on image-token keys, padding kept masked."""
    from swift_plugins._amplifier import AmplifierConfig, HighRiskAmplifier, _AttentionHook

    amp = HighRiskAmplifier(AmplifierConfig(hidden_size=8, num_heads=2, layers=[0], visual_token_ids=[9]))
    with torch.no_grad():
        amp.attn_bias.copy_(torch.tensor([[0.5, -1.0]]))
    ids = torch.tensor([[0, 1, 9, 9, 2], [3, 9, 4, 5, 6]])
    amp._ids_hook(None, (ids,))
    hook = _AttentionHook(amp, 0)
    hidden = torch.zeros(2, 5, 8)
    module = SimpleNamespace(layer_idx=0, config=SimpleNamespace(_attn_implementation="sdpa"))
    lowest = torch.finfo(torch.float32).min
    causal = torch.ones(5, 5).tril().bool()
    image = (ids == 9).float()
    expected = torch.where(causal, 0.0, lowest)[None, None] + torch.tensor([0.5, -1.0])[None, :, None, None] * image[
        :, None, None, :]
    _, kw = hook(module, (), {"hidden_states": hidden, "attention_mask": None})  # sdpa without padding
    torch.testing.assert_close(kw["attention_mask"], expected)
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, :, :, 0] = False  # row 1 is left-padded
    _, kw = hook(module, (), {"hidden_states": hidden, "attention_mask": padded})
    assert (kw["attention_mask"][1, :, :, 0] == lowest).all()
    torch.testing.assert_close(kw["attention_mask"][0], expected[0])
    # A decoding step: one new text query against the prompt's 5 keys + itself.
    amp._ids_hook(None, (torch.tensor([[7], [7]]),))
    cache = SimpleNamespace(get_seq_length=lambda layer: 5)
    _, kw = hook(module, (), {"hidden_states": torch.zeros(2, 1, 8), "attention_mask": None,
                              "past_key_values": cache})
    torch.testing.assert_close(kw["attention_mask"][:, :, 0, :5], expected[:, :, -1, :])
    assert (kw["attention_mask"][:, :, 0, 5] == 0).all()
    with pytest.raises(NotImplementedError):  # a 2-D padding mask (padding_free) cannot carry a bias
        hook(module, (), {"hidden_states": hidden, "attention_mask": torch.ones(2, 5)})
    flash = SimpleNamespace(layer_idx=0, config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(NotImplementedError, match="sdpa"):
        hook(flash, (), {"hidden_states": hidden, "attention_mask": None})


def test_amplifier_in_generation_matches_full_forward(loaded, data):
    """Decoding with a KV cache (swift infer with several new tokens) applies the bias to the prompt's image keys."""
    from swift.utils import to_device

    from swift_plugins._amplifier import attach_new

    model, template = copy.deepcopy(loaded[0]).eval(), loaded[1]
    amp = attach_new(model, "all")
    with torch.no_grad():
        amp.gate.channel.fill_(0.3)
        amp.attn_bias.fill_(3.0)
    rows = [copy.deepcopy(r) for r in data["val_rows"][:2]]
    rows[1]["messages"][0]["content"] = "<image>楼道？"  # a shorter prompt: left padding
    from swift.infer_engine import InferRequest

    encoded = [template.encode(InferRequest(messages=r["messages"][:1], images=r["images"])) for r in rows]
    inputs = to_device(template.data_collator(encoded), model.device)
    inputs.pop("labels", None)
    inputs.pop("position_ids", None)  # let transformers derive the 3-D positions, for the cached and full passes alike
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, min_new_tokens=3)
        stepwise = torch.stack(out.logits, 1).float()  # [B, 3, V]: logits of each generated position
        n = inputs["input_ids"].shape[1]
        full = dict(inputs)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in full:
                extra = out.sequences[:, n:n + 2] if key == "input_ids" else torch.full_like(
                    out.sequences[:, n:n + 2], 1 if key == "attention_mask" else 0)
                full[key] = torch.cat([full[key], extra.to(full[key].dtype)], 1)
        whole = model(**full).logits[:, -3:].float()
        amp.enabled = False
        plain = model(**full).logits[:, -3:].float()
    torch.testing.assert_close(stepwise, whole, rtol=0, atol=1e-4)
    assert (whole - plain).abs().max() > 1e-3  # the bias is large enough that skipping it would show


# --------------------------------------------------------------------------- training, saving, reloading
CAPTURED: dict = {}


def capture_callback():
    """A test-only callback: the live model's outputs on the validation rows when training ends."""
    from swift.callbacks import TrainerCallback

    class CaptureLogits(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            from tools.score import label_token_ids, score_rows

            template = self.trainer.template
            rows = CAPTURED["rows"]
            model.eval()
            with template.generate_context():
                CAPTURED["logits"] = last_logits(model, template, rows)
                CAPTURED["probs"] = score_rows(model, template, label_token_ids(template.tokenizer), rows,
                                               batch_size=len(rows), progress=False)
            model.train()

    return CaptureLogits


def sft(output_dir: Path, model_dir: Path, data: dict, *extra: str) -> dict:
    from swift import sft_main

    from swift_plugins import plugin_files

    argv = base_args(model_dir, train=True) + [
        "--dataset", str(data["train"]), "--val_dataset", str(data["val"]),
        "--external_plugins", *map(str, plugin_files()),
        "--tuner_type", "hr_amplifier", "--loss_type", "weighted_ce", "--callbacks", "amplifier_stats",
        "--eval_metric", "weighted_f1", "--metric_for_best_model", "weighted_f1", "--greater_is_better", "true",
        "--lora_rank", "4", "--learning_rate", "5e-3", "--max_steps", "4", "--warmup_ratio", "0",
        "--per_device_train_batch_size", "3", "--per_device_eval_batch_size", "5", "--gradient_accumulation_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--logging_steps", "1", "--report_to", "tensorboard", "--dataset_num_proc", "1",
        "--dataloader_num_workers", "0", "--seed", "42", "--data_seed", "42",
        "--output_dir", str(output_dir), "--add_version", "false", *extra]
    # swift sets TENSORBOARD_LOGGING_DIR only if unset (os.environ.setdefault): a second in-process run would
    # write its events into the first run's folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        return sft_main(argv)


@pytest.fixture(scope="module")
def trained(tiny_model, data, tmp_path_factory):
    from swift.callbacks import callbacks_map

    callbacks_map["_capture_logits"] = capture_callback()
    CAPTURED.clear()
    CAPTURED["rows"] = data["val_rows"]
    run = tmp_path_factory.mktemp("run")
    result = sft(run, tiny_model, data, "--callbacks", "amplifier_stats", "_capture_logits")
    return SimpleNamespace(run=run, result=result, captured=dict(CAPTURED))


def amplifier_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(checkpoint / "amplifier.safetensors"))


def test_training_moves_amplifier_and_logs_it(trained):
    run = trained.run
    assert {p.name for p in run.glob("checkpoint-*")} >= {"checkpoint-2", "checkpoint-4"}
    ckpt = run / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "amplifier_config.json").exists()
    final, middle = amplifier_tensors(ckpt), amplifier_tensors(run / "checkpoint-2")
    for name in ("gate.channel", "gate.token_scale", "attn_bias"):
        assert final[name].abs().max() > 1e-3, name      # started at exactly zero
        assert not torch.equal(final[name], middle[name]), name
    logs = trained.result["log_history"]
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) == 4
    for key in ("amp/gate_gain_abs_dev", "amp/gate_token_scale", "amp/attn_bias_L0_mean", "amp/attn_bias_L2_absmax"):
        assert all(key in entry for entry in train_logs), key
    assert train_logs[-1]["amp/gate_gain_abs_dev"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run.glob("runs/events.out.tfevents*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/amp/attn_bias_L1_mean", "train/amp/gate_gain_abs_dev", "eval/weighted_f1"} <= tags


def test_metric_chooses_best_checkpoint(trained):
    evals = [entry for entry in trained.result["log_history"] if "eval_weighted_f1" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    for entry in evals:
        assert 0 <= entry["eval_weighted_f1"] <= 6.5
        assert f"eval_f1_{HIGH_RISK}" in entry and "eval_high_risk_recall" in entry
    state = json.loads((trained.run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(max(entry["eval_weighted_f1"] for entry in evals))
    best_step = max(evals, key=lambda entry: (entry["eval_weighted_f1"], -entry["step"]))["step"]
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"


def test_swift_infer_and_score_reproduce_training(trained, data, tmp_path):
    from swift import infer_main

    from swift_plugins._amplifier import find_amplifier
    from tools.score import load, score_rows

    ckpt = trained.run / "checkpoint-4"
    args = json.loads((ckpt / "args.json").read_text())
    assert args["tuner_type"] == "hr_amplifier" and all(Path(p).is_absolute() for p in args["external_plugins"])
    captured = trained.captured["logits"]
    # tools.score (used by test.sh) loads the checkpoint through swift, amplifier included.
    model, template, label_ids, _ = load(["--adapters", str(ckpt), "--max_pixels", MAX_PIXELS])
    torch.testing.assert_close(last_logits(model, template, data["val_rows"]), captured, rtol=0, atol=1e-5)
    probs = score_rows(model, template, label_ids, data["val_rows"], batch_size=5, progress=False)
    np.testing.assert_allclose(probs, trained.captured["probs"], rtol=0, atol=1e-6)
    find_amplifier(model).enabled = False
    without = torch.log_softmax(last_logits(model, template, data["val_rows"]), -1)
    # swift infer (generation, logprobs of the first answer token).
    result = tmp_path / "infer.jsonl"
    infer_main(["--adapters", str(ckpt), "--val_dataset", str(data["val"]), "--max_new_tokens", "1",
                "--temperature", "0", "--logprobs", "true", "--top_logprobs", "5", "--max_batch_size", "5",
                "--max_pixels", MAX_PIXELS, "--result_path", str(result)])
    rows = [json.loads(line) for line in result.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(data["val_rows"])
    got = np.array([[t["logprob"] for t in r["logprobs"]["content"][0]["top_logprobs"]] for r in rows])
    want = torch.log_softmax(captured, -1).topk(5).values.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # ... and not what the model gives without the amplifier, so the match above is not a coincidence.
    assert np.abs(got - without.topk(5).values.numpy()).max() > 2e-4


def test_zeroed_amplifier_changes_outputs(trained, data, tmp_path):
    import safetensors.torch

    from swift_plugins._amplifier import find_amplifier
    from tools.score import load, score_rows

    ckpt = tmp_path / "zeroed"
    shutil.copytree(trained.run / "checkpoint-4", ckpt)
    tensors = amplifier_tensors(ckpt)
    zeroed = {k: (v if k in ("gate.probe", "gate.probe_bias") else torch.zeros_like(v)) for k, v in tensors.items()}
    safetensors.torch.save_file(zeroed, str(ckpt / "amplifier.safetensors"))
    model, template, label_ids, _ = load(["--adapters", str(ckpt), "--max_pixels", MAX_PIXELS])
    logits = last_logits(model, template, data["val_rows"])
    assert (logits - trained.captured["logits"]).abs().max() > 1e-4  # the trained amplifier was really applied
    find_amplifier(model).enabled = False  # zero weights are the identity: plain LoRA
    torch.testing.assert_close(last_logits(model, template, data["val_rows"]), logits, rtol=0, atol=1e-5)


def test_resume_matches_uninterrupted_run(trained, tiny_model, data, tmp_path):
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    sft(resumed, tiny_model, data, "--resume_from_checkpoint", str(trained.run / "checkpoint-2"))
    for name in ("amplifier.safetensors", "adapter_model.safetensors"):
        got, want = load_file(str(resumed / "checkpoint-4" / name)), load_file(str(trained.run / "checkpoint-4" / name))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")


# --------------------------------------------------------------------------- train.sh
FAKE_SWIFT = """#!/usr/bin/env bash
# Records each call's arguments (one a line, then a blank line) and makes the checkpoint train.sh looks for.
printf '%s\\n' "$@" >> "$SWIFT_CALLS"; echo >> "$SWIFT_CALLS"
env | grep '^FIRESAFE_' | sort >> "$SWIFT_CALLS.env"
while [[ $# -gt 0 ]]; do [[ $1 == --output_dir ]] && mkdir -p "$2/checkpoint-1"; shift; done
"""


def run_train_sh(tmp_path: Path, *args: str, **env: str) -> list[list[str]]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "swift").write_text(FAKE_SWIFT)
    (fake / "swift").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "pipeline.env").write_text(': "${RECIPE:=demo}"\n: "${MODEL_STAGE1:=/m1}"\n: "${MODEL_STAGE2:=/m2}"\n')
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FIRESAFE_", "STAGE"))}
    full_env.update(PATH=f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", VENV=str(tmp_path / "novenv"),
                    OUTPUT_DIR=str(out), SWIFT_CALLS=str(calls), **env)
    proc = subprocess.run(["bash", str(ROOT / "train.sh"), *args], env=full_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [call.split("\n") for call in calls.read_text().split("\n\n") if call.strip()]


def flag(argv: list[str], name: str) -> list[str]:
    """Values after --name, up to the next flag (none if the flag is absent)."""
    if name not in argv:
        return []
    i = argv.index(name) + 1
    values = []
    while i < len(argv) and not argv[i].startswith("--"):
        values.append(argv[i])
        i += 1
    return values


def test_train_sh_uses_plugins_for_stage2_by_default(tmp_path):
    from swift_plugins import plugin_files

    stage1, stage2 = run_train_sh(tmp_path, "--lora_rank", "4")
    for argv in (stage1, stage2):
        assert argv[:2] == ["sft", "--model"]
        assert flag(argv, "--external_plugins") == [str(p) for p in plugin_files()]
        assert flag(argv, "--eval_metric") == flag(argv, "--metric_for_best_model") == ["weighted_f1"]
        assert flag(argv, "--save_steps") == flag(argv, "--eval_steps")  # every evaluated step can become the best
        assert argv[-2:] == ["--lora_rank", "4"]  # the user's flags come last and win
        assert flag(argv, "--attn_impl") == []  # recipe speed knobs the demo recipe leaves unset: swift's default
    assert flag(stage1, "--tuner_type") == ["lora"] and flag(stage1, "--loss_type") == []
    assert flag(stage1, "--callbacks") == []
    assert flag(stage2, "--tuner_type") == ["hr_amplifier"] and flag(stage2, "--loss_type") == ["weighted_ce"]
    assert flag(stage2, "--callbacks") == ["amplifier_stats"]


def test_train_sh_turns_plugins_on_for_stage1_and_passes_knobs(tmp_path):
    stage1, stage2 = run_train_sh(tmp_path, STAGE1_LOSS="weighted_ce", FIRESAFE_CLASS_WEIGHTS=f"{HIGH_RISK}=3",
                                  ATTN_IMPL="eager", GRADIENT_CHECKPOINTING="false")
    assert flag(stage1, "--loss_type") == ["weighted_ce"] and flag(stage1, "--tuner_type") == ["lora"]
    assert flag(stage2, "--attn_impl") == ["eager"] and flag(stage2, "--gradient_checkpointing") == ["false"]
    stage1, stage2 = run_train_sh(tmp_path, STAGE1_TUNER="hr_amplifier", STAGE2_LOSS="", EVAL_METRIC="")
    assert flag(stage1, "--tuner_type") == ["hr_amplifier"] and flag(stage1, "--callbacks") == ["amplifier_stats"]
    assert flag(stage2, "--loss_type") == [] and flag(stage2, "--tuner_type") == ["hr_amplifier"]
    for argv in (stage1, stage2):  # empty = off
        assert flag(argv, "--eval_metric") == [] and flag(argv, "--metric_for_best_model") == []
    env = (tmp_path / "calls.txt.env").read_text(encoding="utf-8")
    assert f"FIRESAFE_CLASS_WEIGHTS={HIGH_RISK}=3" in env and "FIRESAFE_AMP_LAYERS=auto" in env


def test_train_sh_sets_liger_per_stage(tmp_path):
    # recipes/real.env turns liger on for stage 1 only: with stage 2's custom loss it would keep full logits.
    stage1, stage2 = run_train_sh(tmp_path, USE_LIGER_KERNEL_STAGE1="true", USE_LIGER_KERNEL_STAGE2="false")
    assert flag(stage1, "--use_liger_kernel") == ["true"] and flag(stage2, "--use_liger_kernel") == ["false"]
    stage1, stage2 = run_train_sh(tmp_path)  # the demo recipe sets neither: swift's default
    assert flag(stage1, "--use_liger_kernel") == [] == flag(stage2, "--use_liger_kernel")
